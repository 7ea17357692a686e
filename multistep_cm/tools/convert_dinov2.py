"""Converts DINOv2 ViT weights to the `.npz` that `evaluation/dinov2.py` reads.

  python -m multistep_cm.tools.convert_dinov2 \
      --weights=dinov2_vitl14_pretrain.pth --out=dinov2_vitl14.npz

Run once, on a machine with the checkpoint. --weights takes the original
release's state dict (dinov2_vitl14_pretrain.pth; needs torch) or timm's
(model.safetensors of timm/vit_large_patch14_dinov2.lvd142m, needs
`pip install safetensors`; or its pytorch_model.bin). The two name their
parameters alike; the layout is told by the names: the original's unused
`mask_token` is dropped, and its `block_chunks` form ('blocks.0.5.norm1')
unchunked. torch files are read with weights_only=True: no pickled code runs.

The hyperparameters come from the shapes: width from the class token, depth
from the blocks, MLP width from fc1, the position grid from pos_embed, and
the heads as width / 64, as in every DINOv2 release (--heads otherwise).
Register tokens and SwiGLU MLPs (ViT-g/14) are not implemented. The .npz
holds the config too, is byte-for-byte reproducible, and its SHA-256 is
printed, for the evaluation config to check. Nothing is downloaded.
"""

import math
import re

import numpy as np

from multistep_cm import weights
from multistep_cm.evaluation import dinov2
from multistep_cm.tools import converting

HEAD_WIDTH = 64  # Every DINOv2 release: S/14 384/6, B 768/12, L 1024/16.
_BLOCK = re.compile(r'blocks\.(?:\d+\.)?(\d+)\.(.+)')  # Chunked or not.
_LINEARS = ('attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2')


def _unchunk(state_dict):
  """{torch name: array} with 'blocks.C.N.' renamed 'blocks.N.' and the
  original's `mask_token` (for masked training only) dropped; a one-line
  WeightsError for what this network lacks."""
  out = {}
  for key, value in state_dict.items():
    if key == 'mask_token':
      continue
    if key in ('register_tokens', 'reg_token'):
      raise weights.WeightsError(
          f'{key!r}: DINOv2 with register tokens (the _reg4 models) is '
          'unsupported; use the release without registers.')
    m = _BLOCK.fullmatch(key)
    if m:
      if m.group(2).startswith(('mlp.w12', 'mlp.w3')):
        raise weights.WeightsError(
            f'{key!r}: SwiGLU MLPs (ViT-g/14) are unsupported.')
      key = f'blocks.{m.group(1)}.{m.group(2)}'
    if key in out:
      raise weights.WeightsError(f'{key!r} appears twice.')
    out[key] = value
  return out


def config_from_state_dict(state_dict, heads=0):
  """DINOv2Config of a state dict's shapes (original or timm names)."""
  state = _unchunk(state_dict)
  try:
    width = state['cls_token'].shape[-1]
    patch = state['patch_embed.proj.weight'].shape[-1]
    hidden = state['blocks.0.mlp.fc1.weight'].shape[0]
    positions = state['pos_embed'].shape[-2] - 1
  except (KeyError, IndexError) as e:
    raise weights.WeightsError(
        f'No usable {e} entry: not a DINOv2 ViT state dict.') from None
  depth = len({_BLOCK.fullmatch(k).group(1) for k in state
               if _BLOCK.fullmatch(k)})
  grid = math.isqrt(max(positions, 0))
  if grid * grid != positions:
    raise weights.WeightsError(
        f'pos_embed has {positions} patch positions: not a square grid.')
  if not heads and width % HEAD_WIDTH:
    raise weights.WeightsError(
        f'Width {width} is not a multiple of {HEAD_WIDTH}: give --heads.')
  return dinov2.DINOv2Config(
      patch_size=patch, embed_dim=width, depth=depth,
      num_heads=heads or width // HEAD_WIDTH, mlp_ratio=hidden / width,
      pos_grid=grid)


def _squeeze_leading(value, ndim):
  """torch's (1, 1, D) class token and (1, T, D) positions -> (D,), (T, D)."""
  while value.ndim > ndim and value.shape[0] == 1:
    value = value[0]
  return value


def convert_state_dict(state_dict, config):
  """torch names and layouts -> this network's: OIHW conv kernel to HWIO,
  (out, in) linear weights to (in, out), LayerNorm weight to scale,
  'blocks.0' to 'blocks_0'; every name and shape checked."""
  out = {}
  for key, value in _unchunk(state_dict).items():
    value = np.asarray(value, np.float32)
    m = _BLOCK.fullmatch(key)
    scope, rest = (f'blocks_{m.group(1)}/', m.group(2)) if m else ('', key)
    owner, _, leaf = rest.rpartition('.')
    if key == 'cls_token':
      name, value = key, _squeeze_leading(value, 1)
    elif key == 'pos_embed':
      name, value = key, _squeeze_leading(value, 2)
    elif key == 'patch_embed.proj.weight':
      name, value = 'patch_embed/proj/kernel', value.transpose(2, 3, 1, 0)
    elif key == 'patch_embed.proj.bias':
      name = 'patch_embed/proj/bias'
    elif leaf in ('weight', 'bias') and (
        owner in ('norm1', 'norm2') if m else owner == 'norm'):
      name = f'{scope}{owner}/{"scale" if leaf == "weight" else "bias"}'
    elif m and owner in _LINEARS and leaf in ('weight', 'bias'):
      name = f'{scope}{owner.replace(".", "/")}/'
      name += 'kernel' if leaf == 'weight' else 'bias'
      value = value.T if leaf == 'weight' else value
    elif m and owner in ('ls1', 'ls2') and leaf == 'gamma':
      name = f'{scope}{owner}/gamma'
    else:
      raise weights.WeightsError(
          f'Unexpected entry {key!r}: not a DINOv2 ViT backbone state dict '
          '(a classifier head, or another model?).')
    out[name] = value
  dinov2.FORMAT.check(out, config)
  return out


def convert(path, out, heads=0):
  """Writes the state dict file `path` to the .npz `out`; returns (config,
  SHA-256 of the .npz)."""
  state = converting.read_state_dict(path)
  config = config_from_state_dict(state, heads)
  return config, dinov2.FORMAT.write(out, convert_state_dict(state, config),
                                     config)


def _flags(parser):
  parser.add_argument('--weights', required=True, help='The original '
                      'release\'s .pth, or timm\'s .safetensors or .bin.')
  parser.add_argument('--heads', type=int, default=0, help='Attention heads, '
                      f'when not width / {HEAD_WIDTH}.')


def _run(unused_parser, args):
  config, digest = convert(args.weights, args.out, args.heads)
  return digest, config


def main(argv=None):
  converting.main(
      argv, __doc__, _flags, _run,
      use_with=('evaluate.dinov2_weights', 'evaluate.dinov2_sha256'))


if __name__ == '__main__':
  main()
