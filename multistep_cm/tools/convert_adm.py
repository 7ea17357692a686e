"""Converts ADM U-Net weights (diffusers or OpenAI) for `multistep_cm.adm`.

  python -m multistep_cm.tools.convert_adm \
      --diffusers=diffusers-cd_imagenet64_l2/unet --out=cd_imagenet64.npz
  python -m multistep_cm.tools.convert_adm \
      --openai=edm_imagenet64_ema.pt --preset=openai_imagenet64 --out=edm64.npz

Run once, on a machine with torch (or only safetensors, for a diffusers
model saved as .safetensors). --diffusers takes a `UNet2DModel` directory
(config.json and diffusion_pytorch_model.safetensors or .bin; a pipeline
directory's unet/ is found); its config says the hyperparameters, and
options the port does not implement are refused. --openai takes a
consistency_models or guided-diffusion state dict (.pt); its hyperparameters
are those of OpenAI's scripts' flags, from a --preset and the flags given
here, with consistency_models' defaults for the rest. guided-diffusion
models trained without --use_new_attention_order need
--legacy_attention_order. Files are read as tensors only: no pickled code is
run. The .npz holds the config too, is byte-for-byte reproducible, and its
SHA-256 is printed.
"""

import argparse
import json

from etils import epath
import numpy as np

from multistep_cm import adm
from multistep_cm import weights
from multistep_cm.tools import converting

# OpenAI's flags for the published models: consistency_models' scripts/
# launch.sh (the EDM teachers and their CD/CT students).
PRESETS = {
    'openai_imagenet64': dict(
        image_size=64, num_channels=192, num_res_blocks=3,
        attention_resolutions='32,16,8', num_head_channels=64,
        class_cond=True, use_scale_shift_norm=True, resblock_updown=True),
    'openai_lsun256': dict(
        image_size=256, num_channels=256, num_res_blocks=2,
        attention_resolutions='32,16,8', num_head_channels=64,
        class_cond=False, use_scale_shift_norm=False, resblock_updown=True),
}
# consistency_models' model_and_diffusion_defaults, for flags not given.
OPENAI_DEFAULTS = dict(
    image_size=64, num_channels=128, num_res_blocks=2, num_heads=4,
    num_head_channels=-1, attention_resolutions='32,16,8', channel_mult='',
    dropout=0., class_cond=False, use_scale_shift_norm=True,
    resblock_updown=False, learn_sigma=False)
# create_model's channel_mult for channel_mult=''.
_OPENAI_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4),
                128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}

# UNet2DModel options this network implements only at these values ...
_DIFFUSERS_DEFAULTS = {
    'center_input_sample': False, 'time_embedding_type': 'positional',
    'freq_shift': 0, 'flip_sin_to_cos': True,
    'mid_block_type': 'UNetMidBlock2D', 'mid_block_scale_factor': 1,
    'downsample_padding': 1, 'act_fn': 'silu', 'norm_num_groups': adm.GROUPS,
    'norm_eps': adm.EPS, 'add_attention': True, 'class_embed_type': None}
# ... and those it reads (num_train_timesteps only matters for 'learned').
_DIFFUSERS_USED = (
    'sample_size', 'in_channels', 'out_channels', 'down_block_types',
    'up_block_types', 'block_out_channels', 'layers_per_block', 'dropout',
    'attention_head_dim', 'num_class_embeds', 'resnet_time_scale_shift',
    'downsample_type', 'upsample_type', 'attn_norm_num_groups',
    'time_embedding_dim', 'num_train_timesteps')
_DOWN = {'DownBlock2D': 'conv', 'ResnetDownsampleBlock2D': 'resnet',
         'AttnDownBlock2D': None}
_UP = {'UpBlock2D': 'conv', 'ResnetUpsampleBlock2D': 'resnet',
       'AttnUpBlock2D': None}
_WEIGHTS = ('diffusion_pytorch_model.safetensors',
            'diffusion_pytorch_model.bin')


def config_from_diffusers(cfg, source):
  """UNet2DModel's config dict -> ADMConfig; weights.WeightsError for an option
  this network does not implement."""
  def refuse(what):
    raise weights.WeightsError(f'{source}: {what} is unsupported.')

  for key, value in cfg.items():
    if key.startswith('_') or key in _DIFFUSERS_USED:
      continue
    if key not in _DIFFUSERS_DEFAULTS or value != _DIFFUSERS_DEFAULTS[key]:
      refuse(f'UNet2DModel option {key}={value!r}')
  try:
    channels = list(cfg['block_out_channels'])
    down, up = list(cfg['down_block_types']), list(cfg['up_block_types'])
    size = cfg['sample_size']
  except KeyError as e:
    raise weights.WeightsError(f'{source}: no {e} in the config.') from None
  if isinstance(size, (list, tuple)):
    if len(set(size)) != 1:
      refuse(f'non-square sample_size {size}')
    size = size[0]
  if size is None or not len(channels) == len(down) == len(up):
    refuse('a config without sample_size, or with unequal numbers of '
           'block_out_channels, down_block_types and up_block_types')
  for way, names, known in (('down', down, _DOWN), ('up', up, _UP)):
    for name in names:
      if name not in known:
        refuse(f'{way} block type {name!r}')
  levels = len(channels)
  attention = [name.startswith('Attn') for name in down]
  if attention != [name.startswith('Attn') for name in reversed(up)]:
    refuse(f'attention in {down} but not at the same levels of {up}')
  resampling = {_DOWN.get(name) or cfg.get('downsample_type') or 'conv'
                for name in down[:-1]}
  resampling |= {_UP.get(name) or cfg.get('upsample_type') or 'conv'
                 for name in up[:-1]}
  if not resampling <= {'conv', 'resnet'} or len(resampling) > 1:
    refuse(f'resampling by {sorted(map(str, resampling))} (one of conv or '
           'resnet)')
  if any(c % channels[0] for c in channels):
    refuse(f'block_out_channels {channels} not multiples of the first')
  if cfg.get('time_embedding_dim') not in (None, 4 * channels[0]):
    refuse(f'time_embedding_dim={cfg["time_embedding_dim"]}')
  shift = cfg.get('resnet_time_scale_shift', 'default')
  if shift not in ('default', 'scale_shift'):
    refuse(f'resnet_time_scale_shift={shift!r}')
  # The middle block's attention has a GroupNorm only so; the others always.
  if cfg.get('attn_norm_num_groups') != adm.GROUPS and not (
      cfg.get('attn_norm_num_groups') is None and shift == 'default'):
    refuse(f'attn_norm_num_groups={cfg.get("attn_norm_num_groups")!r} with '
           f'resnet_time_scale_shift={shift!r}')
  head_dim = cfg.get('attention_head_dim', 8)
  try:
    return adm.ADMConfig(
        image_size=int(size), in_channels=cfg.get('in_channels', 3),
        out_channels=cfg.get('out_channels', 3), model_channels=channels[0],
        channel_mult=tuple(c // channels[0] for c in channels),
        num_res_blocks=cfg.get('layers_per_block', 2),
        attention_resolutions=tuple(size // 2**level for level in
                                    range(levels) if attention[level]),
        num_head_channels=head_dim or -1, num_heads=1,
        num_classes=cfg.get('num_class_embeds') or 0,
        dropout=float(cfg.get('dropout', 0.)),
        resblock_updown=resampling != {'conv'},
        use_scale_shift_norm=shift == 'scale_shift')
  except ValueError as e:
    raise weights.WeightsError(f'{source}: {e}') from None


def config_from_openai(flags):
  """ADMConfig of OpenAI's flags (a dict of create_model's arguments)."""
  f = {**OPENAI_DEFAULTS, **flags}
  size = f['image_size']
  if f['channel_mult']:
    mult = tuple(float(m) if '.' in m else int(m)
                 for m in f['channel_mult'].split(','))
  elif size in _OPENAI_MULT:
    mult = _OPENAI_MULT[size]
  else:
    raise weights.WeightsError(
        f'No default channel_mult for image_size {size}: give --channel_mult.')
  try:
    return adm.ADMConfig(
        image_size=size, out_channels=6 if f['learn_sigma'] else 3,
        model_channels=f['num_channels'], channel_mult=mult,
        num_res_blocks=f['num_res_blocks'],
        attention_resolutions=tuple(
            int(r) for r in str(f['attention_resolutions']).split(',')),
        num_head_channels=f['num_head_channels'],
        num_heads=1 if f['num_head_channels'] > 0 else f['num_heads'],
        num_classes=1000 if f['class_cond'] else 0, dropout=f['dropout'],
        resblock_updown=f['resblock_updown'],
        use_scale_shift_norm=f['use_scale_shift_norm'])
  except ValueError as e:
    raise weights.WeightsError(str(e)) from None


# ----------------------------------------------------------------------------
# Names: every module with parameters, in both sources' terms.
# ----------------------------------------------------------------------------

# A parameter module of each kind: (this network's leaf, the source's leaf).
_LEAVES = {'dense': (('kernel', 'weight'), ('bias', 'bias')),
           'conv': (('kernel', 'weight'), ('bias', 'bias')),
           'norm': (('scale', 'weight'), ('bias', 'bias')),
           'embed': (('embedding', 'weight'),),
           'qkv': (('kernel', 'weight'), ('bias', 'bias'))}
# A ResBlock's and an AttentionBlock's modules: (this network's, diffusers',
# OpenAI's, kind). OpenAI's qkv holds query, key and value.
_RES = (('norm_1', 'norm1', 'in_layers.0', 'norm'),
        ('conv_1', 'conv1', 'in_layers.2', 'conv'),
        ('emb_proj', 'time_emb_proj', 'emb_layers.1', 'dense'),
        ('norm_2', 'norm2', 'out_layers.0', 'norm'),
        ('conv_2', 'conv2', 'out_layers.3', 'conv'),
        ('skip', 'conv_shortcut', 'skip_connection', 'conv'))
_ATTN = (('norm', 'group_norm', 'norm', 'norm'),
         ('query', 'to_q', None, 'dense'), ('key', 'to_k', None, 'dense'),
         ('value', 'to_v', None, 'dense'), ('out', 'to_out.0', 'proj_out',
                                            'dense'))


def _blocks(config):
  """(this network's block, diffusers' prefix, OpenAI's prefix, kind) of
  every block, in the network's order; kind is 'res', 'attn', or that of a
  single parameter module."""
  cfg, levels = config, len(config.channel_mult)
  rows = [('time_embed_1', 'time_embedding.linear_1', 'time_embed.0', 'dense'),
          ('time_embed_2', 'time_embedding.linear_2', 'time_embed.2', 'dense')]
  if cfg.num_classes:
    rows.append(('label_embed', 'class_embedding', 'label_emb', 'embed'))
  rows.append(('conv_in', 'conv_in', 'input_blocks.0.0', 'conv'))
  k = 1  # OpenAI's input_blocks index.
  for level in range(levels):
    for j in range(cfg.num_res_blocks):
      d, o = f'down_blocks.{level}', f'input_blocks.{k}'
      rows.append((f'down_{level}_res_{j}', f'{d}.resnets.{j}', f'{o}.0',
                   'res'))
      if cfg.has_attention(level):
        rows.append((f'down_{level}_attn_{j}', f'{d}.attentions.{j}',
                     f'{o}.1', 'attn'))
      k += 1
    if level < levels - 1:
      d, o = f'down_blocks.{level}.downsamplers.0', f'input_blocks.{k}.0'
      rows.append((f'down_{level}_downsample',
                   *((d, o, 'res') if cfg.resblock_updown else
                     (f'{d}.conv', f'{o}.op', 'conv'))))
      k += 1
  rows += [('mid_res_0', 'mid_block.resnets.0', 'middle_block.0', 'res'),
           ('mid_attn_0', 'mid_block.attentions.0', 'middle_block.1', 'attn'),
           ('mid_res_1', 'mid_block.resnets.1', 'middle_block.2', 'res')]
  k = 0  # OpenAI's output_blocks index.
  for level in reversed(range(levels)):
    d = f'up_blocks.{levels - 1 - level}'
    for j in range(cfg.num_res_blocks + 1):
      o = f'output_blocks.{k}'
      rows.append((f'up_{level}_res_{j}', f'{d}.resnets.{j}', f'{o}.0',
                   'res'))
      if cfg.has_attention(level):
        rows.append((f'up_{level}_attn_{j}', f'{d}.attentions.{j}', f'{o}.1',
                     'attn'))
      k += 1
    if level:
      d = f'{d}.upsamplers.0'
      o = f'output_blocks.{k - 1}.{2 if cfg.has_attention(level) else 1}'
      rows.append((f'up_{level}_upsample',
                   *((d, o, 'res') if cfg.resblock_updown else
                     (f'{d}.conv', f'{o}.conv', 'conv'))))
  rows += [('norm_out', 'conv_norm_out', 'out.0', 'norm'),
           ('conv_out', 'conv_out', 'out.2', 'conv')]
  return rows


def _modules(config, source, want):
  """(this network's module, or the three of OpenAI's qkv; the source's
  module; kind) of every parameter module of `source` 'diffusers' or
  'openai', for the network whose parameter shapes are `want`."""
  openai = source == 'openai'
  for block, d, o, kind in _blocks(config):
    prefix = o if openai else d
    if kind == 'res':
      for name, dn, on, k in _RES:
        if name != 'skip' or f'{block}/skip/kernel' in want:
          yield f'{block}/{name}', f'{prefix}.{on if openai else dn}', k
    elif kind == 'attn' and openai:
      yield f'{block}/norm', f'{prefix}.norm', 'norm'
      yield tuple(f'{block}/{n}' for n in ('query', 'key', 'value')), (
          f'{prefix}.qkv'), 'qkv'
      yield f'{block}/out', f'{prefix}.proj_out', 'dense'
    elif kind == 'attn':
      for name, dn, _, k in _ATTN:
        yield f'{block}/{name}', f'{prefix}.{dn}', k
    else:
      yield block, prefix, kind


def _linear(w):
  """(out, in) of a torch Linear, or of a 1x1 Conv1d/Conv2d, -> (in, out)."""
  if w.ndim > 2 and all(s == 1 for s in w.shape[2:]):
    w = w.reshape(w.shape[:2])
  return w.T if w.ndim == 2 else w


def _convert(kind, leaf, value, heads, legacy):
  """A source tensor -> this network's array(s) of the leaf."""
  if kind == 'conv' and leaf == 'kernel' and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO.
  if kind == 'dense' and leaf == 'kernel':
    return _linear(value)
  if kind != 'qkv':
    return value
  if legacy:  # guided-diffusion's QKVAttentionLegacy: heads, then q/k/v.
    rest = value.shape[1:]
    value = value.reshape(heads, 3, -1, *rest).swapaxes(0, 1).reshape(
        -1, *rest)
  parts = np.split(value, 3)
  return [_linear(p) if leaf == 'kernel' else p for p in parts]


def convert_state_dict(state_dict, config, source, where,
                       legacy_attention_order=False):
  """{name: array} of a `source` ('diffusers' or 'openai') state dict ->
  this network's parameters for `config`; weights.WeightsError naming the first
  tensor that is missing, of the wrong shape, or unexpected."""
  want = adm.param_shapes(config)
  out, used = {}, set()
  for module, src, kind in _modules(config, source, want):
    for leaf, src_leaf in _LEAVES[kind]:
      key = f'{src}.{src_leaf}'
      if key not in state_dict:
        raise weights.WeightsError(
            f'{where} is not a {source} ADM state dict for this config: no '
            f'{key!r}.')
      used.add(key)
      value = np.asarray(state_dict[key], np.float32)
      names = module if kind == 'qkv' else (module,)
      heads = (config.heads(want[f'{names[0]}/kernel'][-1])
               if kind == 'qkv' else 0)
      try:
        arrays = _convert(kind, leaf, value, heads, legacy_attention_order)
      except ValueError:
        arrays = None
      arrays = arrays if kind == 'qkv' and arrays is not None else [arrays]
      for name, array in zip(names, arrays):
        name = f'{name}/{leaf}'
        if array is None or array.shape != want[name]:
          raise weights.WeightsError(
              f'{where}: {key!r} has shape {value.shape}, which does not give '
              f'{name} of shape {want[name]}: a different config?')
        out[name] = array
  extra = sorted(set(state_dict) - used)
  if extra:
    raise weights.WeightsError(f'{where}: unexpected tensor {extra[0]!r} '
                          f'({len(extra)} in all): a different config?')
  adm.FORMAT.check(out, config, where)
  return out


# ----------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------


def read_diffusers(directory):
  """(ADMConfig, state dict) of a UNet2DModel directory, or of a pipeline
  directory's unet/."""
  directory = epath.Path(directory)
  if (directory / 'unet' / 'config.json').exists():
    directory = directory / 'unet'
  try:
    cfg = json.loads((directory / 'config.json').read_text())
  except (OSError, ValueError) as e:
    raise weights.WeightsError(
        f'Cannot read {directory / "config.json"} ({type(e).__name__}): not '
        'a diffusers model directory.') from None
  if cfg.get('_class_name', 'UNet2DModel') != 'UNet2DModel':
    raise weights.WeightsError(
        f'{directory} holds a {cfg["_class_name"]}, not a UNet2DModel.')
  config = config_from_diffusers(cfg, directory / 'config.json')
  for name in _WEIGHTS:
    if (directory / name).exists():
      return (config, converting.read_state_dict(directory / name),
              directory / name)
  raise weights.WeightsError(f'{directory} has none of {", ".join(_WEIGHTS)}.')


def convert_diffusers(directory, out):
  """Returns (ADMConfig, SHA-256 of the written .npz)."""
  config, state, where = read_diffusers(directory)
  arrays = convert_state_dict(state, config, 'diffusers', where)
  return config, adm.FORMAT.write(out, arrays, config)


def convert_openai(pt, flags, out, legacy_attention_order=False):
  """`flags`: OpenAI's create_model arguments (see OPENAI_DEFAULTS).
  Returns (ADMConfig, SHA-256 of the written .npz)."""
  config = config_from_openai(flags)
  arrays = convert_state_dict(converting.read_state_dict(pt), config,
                              'openai', pt,
                              legacy_attention_order)
  return config, adm.FORMAT.write(out, arrays, config)


def _bool(text):
  if text.lower() in ('true', '1', 'yes'):
    return True
  if text.lower() in ('false', '0', 'no'):
    return False
  raise argparse.ArgumentTypeError(f'expected True or False, not {text!r}')


def _flags(parser):
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--diffusers', help='A UNet2DModel (or pipeline) '
                      'directory.')
  source.add_argument('--openai', help='An OpenAI state dict (.pt).')
  parser.add_argument('--preset', choices=sorted(PRESETS),
                      help='--openai: the flags of a published model.')
  parser.add_argument('--legacy_attention_order', action='store_true',
                      help='--openai: qkv split by heads first '
                      '(guided-diffusion without --use_new_attention_order).')
  types = {bool: _bool, str: str, int: int, float: float}
  for name, default in OPENAI_DEFAULTS.items():
    parser.add_argument(f'--{name}', type=types[type(default)],
                        help=f'--openai: as OpenAI\'s flag (default: preset, '
                        f'else {default!r}).')


def _run(parser, args):
  flags = {k: getattr(args, k) for k in OPENAI_DEFAULTS
           if getattr(args, k) is not None}
  if args.diffusers and (flags or args.preset or args.legacy_attention_order):
    parser.error('--diffusers reads its config.json: no OpenAI flags.')
  if args.diffusers:
    config, digest = convert_diffusers(args.diffusers, args.out)
  else:
    config, digest = convert_openai(
        args.openai, {**PRESETS.get(args.preset, {}), **flags}, args.out,
        args.legacy_attention_order)
  return digest, config


def main(argv=None):
  converting.main(argv, __doc__, _flags, _run)


if __name__ == '__main__':
  main()
