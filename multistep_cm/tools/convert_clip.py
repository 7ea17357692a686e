"""Converts open_clip ViT weights, and tokenizes prompts, for `clip.py`.

  python -m multistep_cm.tools.convert_clip \
      --weights=open_clip_model.safetensors --model=ViT-B-32 --out=clip.npz
  python -m multistep_cm.tools.convert_clip \
      --prompts=prompts.txt --model=ViT-B-32 --out=prompt_tokens.npz

Run once, on a machine with the checkpoint. --weights takes an open_clip
state dict (.safetensors needs `pip install safetensors`; .bin/.pt/.pth need
torch, and OpenAI's TorchScript .pt files work too); its hyperparameters come
from --model, an open_clip model name whose JSON config is read from the
installed open_clip_torch package (without importing it), or from --config, a
JSON file in open_clip's format (a HF hub open_clip_config.json works).
OpenAI's weights were trained with QuickGELU: use the '-quickgelu' names.
The .npz holds the config too, is byte-for-byte reproducible, and its SHA-256
is printed, for the evaluation config to check.

--prompts takes a text file, one prompt per line, and writes the prompts and
their open_clip token ids (needs open_clip_torch), so that evaluation needs no
BPE tokenizer. Nothing is downloaded.
"""

import importlib.util
import json
import sys
import types

from etils import epath
import numpy as np

from multistep_cm import weights
from multistep_cm.evaluation import clip
from multistep_cm.tools import converting

_LAYER_NORMS = ('ln_1', 'ln_2', 'ln_pre', 'ln_post', 'ln_final')
_LINEARS = ('c_fc', 'c_proj', 'out_proj')
# Not parameters of the embeddings: the contrastive loss's temperature and
# bias, and OpenAI's archives' hyperparameters.
_IGNORED = ('logit_scale', 'logit_bias', 'input_resolution', 'context_length',
            'vocab_size')
# open_clip options that leave inference unchanged ...
_HARMLESS = {
    'top': ('custom_text', 'init_logit_scale', 'init_logit_bias',
            'nonscalar_logit_scale', 'preprocess_cfg'),
    'vision_cfg': ('patch_dropout', 'output_tokens', 'attn_pooler_queries',
                   'attn_pooler_heads'),
    'text_cfg': ('hf_tokenizer_name', 'tokenizer_mode', 'tokenizer_kwargs',
                 'pad_id', 'eos_id', 'output_tokens'),
}
# ... and those this network implements only at their default value.
_COMMON_DEFAULTS = {
    'act_kwargs': None, 'norm_kwargs': None, 'block_type': None,
    'qk_norm': False, 'scaled_cosine_attn': False, 'scale_heads': False,
    'scale_attn_inner': False, 'scale_attn': False, 'scale_fc': False}
_DEFAULTS = {
    'vision_cfg': {**_COMMON_DEFAULTS, 'ls_init_value': None,
                   'attentional_pool': False, 'no_ln_pre': False,
                   'pos_embed_type': 'learnable', 'final_ln_after_pool': False,
                   'pool_type': 'tok', 'timm_model_name': None},
    'text_cfg': {**_COMMON_DEFAULTS, 'ls_init_value': None, 'embed_cls': False,
                 'no_causal_mask': False, 'final_ln_after_pool': False,
                 'pool_type': 'argmax', 'proj_bias': False,
                 'proj_type': 'linear', 'hf_model_name': None},
}


def _square(value, what):
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise weights.WeightsError(f'Non-square {what} {value} is unsupported.')
    value = value[0]
  return int(value)


def config_from_open_clip(cfg, source):
  """open_clip's model config dict -> CLIPConfig; WeightsError for any
  option this network does not implement."""
  preprocess_cfg = cfg.get('preprocess_cfg', {})
  cfg = cfg.get('model_cfg', cfg)  # HF hub's open_clip_config.json.
  preprocess_cfg = cfg.get('preprocess_cfg', preprocess_cfg)
  vision, text = cfg.get('vision_cfg', {}), cfg.get('text_cfg', {})
  used = {'top': ('embed_dim', 'vision_cfg', 'text_cfg', 'quick_gelu'),
          'vision_cfg': ('layers', 'width', 'head_width', 'mlp_ratio',
                         'patch_size', 'image_size'),
          'text_cfg': ('context_length', 'vocab_size', 'width', 'heads',
                       'layers', 'mlp_ratio')}
  for part, d in (('top', cfg), ('vision_cfg', vision), ('text_cfg', text)):
    defaults = _DEFAULTS.get(part, {})
    for key, value in d.items():
      if key in used[part] or key in _HARMLESS[part] or (
          key in defaults and value in (defaults[key], 'default')):
        continue
      raise weights.WeightsError(
          f'{source}: open_clip option {part}.{key}={value!r} is unsupported '
          '(only ViT image towers with the standard text transformer).')
  if isinstance(vision.get('layers', 12), (list, tuple)):
    raise weights.WeightsError(
        f'{source}: ResNet image towers are unsupported, only ViTs.')
  if (tuple(preprocess_cfg.get('mean', clip.MEAN)) != clip.MEAN or
      tuple(preprocess_cfg.get('std', clip.STD)) != clip.STD):
    raise weights.WeightsError(
        f'{source}: only OpenAI\'s normalisation mean/std is supported.')
  width = vision.get('width', 768)
  try:
    return clip.CLIPConfig(
        embed_dim=cfg['embed_dim'],
        image_size=_square(vision.get('image_size', 224), 'image_size'),
        patch_size=_square(vision.get('patch_size', 16), 'patch_size'),
        vision_width=width, vision_layers=vision.get('layers', 12),
        vision_heads=width // vision.get('head_width', 64),
        vision_mlp_ratio=float(vision.get('mlp_ratio', 4.)),
        context_length=text.get('context_length', 77),
        vocab_size=text.get('vocab_size', 49408),
        text_width=text.get('width', 512), text_layers=text.get('layers', 12),
        text_heads=text.get('heads', 8),
        text_mlp_ratio=float(text.get('mlp_ratio', 4.)),
        quick_gelu=bool(cfg.get('quick_gelu', False)))
  except KeyError as e:
    raise weights.WeightsError(f'{source}: no {e} in the config.') from None


def model_config(name):
  """CLIPConfig of an open_clip model name, from the installed package's
  JSON, without importing the package (and torchvision with it)."""
  spec = importlib.util.find_spec('open_clip')
  if spec is None:
    raise weights.WeightsError(
        'open_clip model names need `pip install open_clip_torch`; or pass '
        'a JSON config with --config.')
  path = epath.Path(spec.submodule_search_locations[0], 'model_configs',
                    f'{name}.json')
  if not path.exists():
    raise weights.WeightsError(
        f'{name!r} is not an open_clip model name (no {path}).')
  return config_file(path, f'open_clip model {name}')


def config_file(path, source=None):
  """CLIPConfig of an open_clip model config JSON file."""
  try:
    cfg = json.loads(epath.Path(path).read_text())
  except (OSError, ValueError) as e:
    raise weights.WeightsError(
        f'Cannot read the open_clip model config {path} '
        f'({type(e).__name__}).') from None
  return config_from_open_clip(cfg, source or path)


def convert_state_dict(state_dict, config):
  """open_clip names and layouts -> this network's: OIHW conv kernel to HWIO,
  (out, in) linear weights to (in, out), torch's packed in_proj to a Dense,
  LayerNorm weight to scale, 'resblocks.0' to 'resblocks_0'."""
  out = {}
  for key, value in state_dict.items():
    # Training checkpoints' DDP prefix; CustomTextCLIP's text tower prefix.
    key = key.removeprefix('module.').removeprefix('text.')
    if key in _IGNORED:
      continue
    parts = []
    for p in key.split('.'):
      if p.isdigit() and parts:
        parts[-1] += f'_{p}'
      else:
        parts.append(p)
    value = np.asarray(value, np.float32)
    *scope, owner, leaf = [''] + parts
    if owner == 'attn' and leaf in ('in_proj_weight', 'in_proj_bias'):
      scope, owner, leaf = [*scope, owner], 'in_proj', leaf[len('in_proj_'):]
    if owner == 'conv1' and leaf == 'weight':
      name, value = [*scope, owner, 'kernel'], value.transpose(2, 3, 1, 0)
    elif owner in _LAYER_NORMS and leaf in ('weight', 'bias'):
      name = [*scope, owner, 'scale' if leaf == 'weight' else 'bias']
    elif owner in _LINEARS + ('in_proj',) and leaf in ('weight', 'bias'):
      is_weight = leaf == 'weight'
      name = [*scope, owner, 'kernel' if is_weight else 'bias']
      value = value.T if is_weight else value
    elif owner == 'token_embedding' and leaf == 'weight':
      name = [*scope, owner, 'embedding']
    elif leaf in ('class_embedding', 'positional_embedding', 'proj',
                  'text_projection'):
      name = [*scope, owner, leaf]
    else:
      raise weights.WeightsError(
          f'Unexpected entry {key!r}: not an open_clip ViT CLIP state dict.')
    out['/'.join(n for n in name if n)] = value
  clip.FORMAT.check(out, config)
  return out


def convert(path, config, out):
  """Writes the state dict file `path` with `config` (a CLIPConfig) to the
  .npz `out`; returns its SHA-256."""
  arrays = convert_state_dict(converting.read_state_dict(path), config)
  return clip.FORMAT.write(out, arrays, config)


def past_cuda_torchvision(package, load):
  """`load()`, which imports `package`, also next to a CPU-only torch.

  PyPI's Linux torchvision wheels are CUDA builds: next to a CPU-only torch
  their operators fail to load and `import torchvision` fails registering
  fake kernels for them. open_clip and diffusers need none of those
  operators: on that failure they are imported again without the
  registrations.
  """
  try:
    return load()
  except RuntimeError:
    for name in [m for m in sys.modules
                 if m.split('.')[0] in (package, 'torchvision')]:
      del sys.modules[name]
    sys.modules['torchvision._meta_registrations'] = types.ModuleType(
        'torchvision._meta_registrations')
    return load()


def import_open_clip():
  """open_clip, also next to a CPU-only torch."""
  try:
    return past_cuda_torchvision(
        'open_clip', lambda: importlib.import_module('open_clip'))
  except ImportError:
    raise weights.WeightsError(
        'Tokenizing needs `pip install open_clip_torch`.') from None


def tokenize(prompts_file, model, out):
  """Writes the prompts of `prompts_file` (one a line) and their token ids for
  open_clip model `model` to the .npz `out`; returns its SHA-256."""
  path = epath.Path(prompts_file)
  if not path.exists():
    raise weights.WeightsError(f'{prompts_file} does not exist.')
  prompts = path.read_text(encoding='utf-8').splitlines()
  if not prompts or any(not p.strip() for p in prompts):
    raise weights.WeightsError(
        f'{prompts_file}: expected one non-empty prompt a line.')
  model_config(model)  # Tokens only for a model this network implements.
  tokens = import_open_clip().get_tokenizer(model)(prompts)
  epath.Path(out).parent.mkdir(parents=True, exist_ok=True)
  weights.write_npz(out, {'prompts': np.array(prompts),
                          'tokens': np.asarray(tokens, np.int32)})
  return weights.sha256_of(out)


def _flags(parser):
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--weights', help='An open_clip state dict: .safetensors'
                      ', .bin, .pt or .pth.')
  source.add_argument('--prompts', help='A text file, one prompt a line, to '
                      'tokenize.')
  parser.add_argument('--model', help='The open_clip model name, e.g. '
                      'ViT-B-32 (ViT-B-32-quickgelu for OpenAI\'s weights).')
  parser.add_argument('--config', help='Instead of --model for --weights: '
                      'an open_clip model config .json.')


def _run(parser, args):
  if args.weights and bool(args.model) == bool(args.config):
    parser.error('--weights needs one of --model and --config.')
  if args.prompts and not args.model:
    parser.error('--prompts needs --model (for its tokenizer).')
  if args.prompts:
    return tokenize(args.prompts, args.model, args.out), None
  config = (config_file(args.config) if args.config
            else model_config(args.model))
  return convert(args.weights, config, args.out), config


def main(argv=None):
  converting.main(argv, __doc__, _flags, _run)


if __name__ == '__main__':
  main()
