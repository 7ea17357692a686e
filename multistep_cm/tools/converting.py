"""What every converter shares: reading a torch or safetensors state dict
without running pickled code, torch.hub's name check, and the command line
(the converter's source flags, --out, three lines printed, one `error:` line
on failure)."""

import argparse
import io
import re
import sys

from etils import epath
import numpy as np

from multistep_cm import weights

WeightsError = weights.WeightsError


def read_state_dict(path):
  """{name: float32 array} of a .safetensors or torch-saved state dict (an
  open_clip training checkpoint's 'state_dict', OpenAI's TorchScript
  archives too), read as tensors only (`torch.load(weights_only=True)`: no
  pickled code runs); anything else is one WeightsError line."""
  path = epath.Path(path)
  if not path.exists():
    raise WeightsError(f'{path} does not exist.')
  blob = path.read_bytes()
  try:
    if path.name.endswith('.safetensors'):
      from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
      try:
        return {k: np.asarray(v, np.float32)
                for k, v in st_numpy.load(blob).items()}
      except KeyError:  # bfloat16, which numpy lacks: torch reads it.
        from safetensors import torch as st_torch  # pylint: disable=g-import-not-at-top
        return {k: v.float().numpy() for k, v in st_torch.load(blob).items()}
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise WeightsError(
        f'Reading {path} needs `pip install {e.name.split(".")[0]}`.'
    ) from None
  except Exception as e:  # pylint: disable=broad-except
    # safetensors' errors are of its own (Rust) types.
    raise WeightsError(f'{path}: not a safetensors file ({e}).') from None
  try:
    state = torch.load(io.BytesIO(blob), map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    # Other bytes fail in many ways (UnpicklingError, KeyError, EOFError...).
    state = _torchscript_state_dict(blob) if 'TorchScript' in str(e) else None
    if state is None:
      raise WeightsError(
          f'{path}: not a torch state dict ({type(e).__name__}: '
          f'{str(e).splitlines()[0] if str(e) else ""}).') from None
  if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
    state = state['state_dict']  # open_clip's training checkpoints.
  if not isinstance(state, dict):
    raise WeightsError(f'{path}: not a state dict (a dict of tensors) but '
                       f'a {type(state).__name__}.')
  for key, value in state.items():
    if not isinstance(value, torch.Tensor):
      raise WeightsError(f'{path}: not a state dict: {key!r} is a '
                         f'{type(value).__name__}, not a tensor.')
  return {k: v.float().numpy() for k, v in state.items()}


def _torchscript_state_dict(blob):
  """The state dict of a TorchScript archive (OpenAI's CLIP checkpoints),
  or None when it is not one."""
  import torch  # pylint: disable=g-import-not-at-top
  try:
    return torch.jit.load(io.BytesIO(blob), map_location='cpu').state_dict()
  except Exception:  # pylint: disable=broad-except
    return None


def check_name_hash(path):
  """torch.hub's check: a file named '...-<hex>.pth' must have a SHA-256 that
  starts with <hex>."""
  m = re.search(r'-([0-9a-f]{8,})\.pth?$', epath.Path(path).name)
  if m and not weights.sha256_of(path).startswith(m.group(1)):
    raise WeightsError(
        f'{path}: SHA-256 does not start with {m.group(1)}, as its name '
        'promises: the download is incomplete or damaged.')


def main(argv, doc, add_flags, convert, use_with=None):
  """A converter's command line: the flags `add_flags(parser)` adds and
  --out; `convert(parser, args)` writes args.out and returns (SHA-256, the
  config it wrote or None). Prints what was written, its SHA-256 and, given
  `use_with` (the config fields of the file and of its digest), the flags
  that use it; a WeightsError ends it in one `error:` line."""
  parser = argparse.ArgumentParser(description=doc.split('\n')[0])
  add_flags(parser)
  parser.add_argument('--out', required=True, help='The .npz to write.')
  args = parser.parse_args(argv)
  try:
    digest, config = convert(parser, args)
  except WeightsError as e:
    sys.exit(f'error: {e}')
  lines = [f'wrote {args.out}' + (f' ({config})' if config else ''),
           f'SHA-256 {digest}']
  if use_with:
    lines.append(f'Use it with --config.{use_with[0]}={args.out} '
                 f'--config.{use_with[1]}={digest}')
  print('\n'.join(lines))
