"""Networks imported from elsewhere: reading their converted `.npz` weights,
checked name by name and shape by shape against the network they are for.

ADM U-Nets (OpenAI's EDM teacher and its CD/CT students) are written by
`tools/convert_adm.py` with their `adm.ADMConfig` in the `__config__` entry;
`load_adm` reads them back, for the teacher loader (`state.load_teacher`)
and for sampling a published student. Nothing is ever downloaded.
"""

import hashlib
import io

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from multistep_cm import adm
from multistep_cm import errors

CONFIG_KEY = '__config__'  # The .npz entry that holds the ADMConfig.
HOW_TO_GET = (
    'Convert a diffusers UNet2DModel or an OpenAI .pt once, on a machine '
    'with torch: `python -m multistep_cm.tools.convert_adm --diffusers=<dir> '
    '--out=adm.npz` or `... --openai=<model.pt> --preset=openai_imagenet64 '
    '--out=adm.npz`.')


class ADMWeightsError(errors.UserError):
  """Missing, unreadable or mismatched ADM weights, or an unsupported
  configuration of the source model."""


def describe_mismatch(arrays, want):
  """How named arrays differ from the names and shapes `want`, e.g. '2
  missing (e.g. a/b); 1 of wrong shape (e.g. c: (3,) instead of (4,))', or
  '' if they do not."""
  missing = sorted(set(want) - set(arrays))
  extra = sorted(set(arrays) - set(want))
  wrong = sorted(k for k in set(want) & set(arrays)
                 if tuple(arrays[k].shape) != want[k])
  parts = [f'{len(missing)} missing (e.g. {missing[0]})' if missing else '',
           f'{len(extra)} unexpected (e.g. {extra[0]})' if extra else '',
           f'{len(wrong)} of wrong shape (e.g. {wrong[0]}: '
           f'{tuple(arrays[wrong[0]].shape)} instead of {want[wrong[0]]})'
           if wrong else '']
  return '; '.join(p for p in parts if p)


def check_adm_arrays(arrays, config, source):
  """Raises ADMWeightsError unless `arrays` has exactly the names and shapes
  of the ADM network for `config`."""
  mismatch = describe_mismatch(arrays, adm.param_shapes(config))
  if mismatch:
    raise ADMWeightsError(
        f'{source} does not match the ADM config: {mismatch}.')


def flatten(tree):
  """{'a': {'b': {'c': leaf}}} -> {'a/b/c': leaf}: a parameter tree as the
  converted files name its arrays."""
  return {'/'.join(k.key for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def shapes(tree):
  """{'a/b/c': shape}: the names and shapes converted files must have."""
  return {k: tuple(v.shape) for k, v in flatten(tree).items()}


def unflatten(arrays):
  """{'a/b/c': array} -> {'a': {'b': {'c': array}}}."""
  params = {}
  for name, value in arrays.items():
    *scopes, leaf = name.split('/')
    node = params
    for s in scopes:
      node = node.setdefault(s, {})
    node[leaf] = value
  return params


def read_npz(path, sha256, error, what, hint=''):
  """(arrays, SHA-256) of an .npz (local or gs://), never unpickled, its
  digest checked when one is given; every failure is one `error` line naming
  `what` the file should hold, followed by `hint` where it says how to get
  one."""
  tail = f' {hint}' if hint else ''
  try:
    blob = epath.Path(path).read_bytes()
  except (OSError, ValueError) as e:  # tf.errors.NotFoundError is an OSError.
    raise error(f'Cannot read {what} {path} ({type(e).__name__}).'
                f'{tail}') from None
  digest = hashlib.sha256(blob).hexdigest()
  if sha256 and digest != sha256.lower():
    raise error(f'{path} has SHA-256 {digest}, not the expected {sha256}: a '
                f'different or damaged file.{tail}')
  try:
    with np.load(io.BytesIO(blob), allow_pickle=False) as f:
      return {k: f[k] for k in f.files}, digest
  except (OSError, ValueError) as e:
    raise error(f'{path} is not a readable .npz ({e}).{tail}') from None


def load_adm(path, sha256=''):
  """(ADMConfig, params) from a `convert_adm` .npz (local or gs://), its
  SHA-256 checked when one is given."""
  arrays, _ = read_npz(path, sha256, ADMWeightsError, 'ADM weights',
                       HOW_TO_GET)
  if CONFIG_KEY not in arrays:
    raise ADMWeightsError(f'{path} has no {CONFIG_KEY!r} entry: not written '
                          f'by convert_adm. {HOW_TO_GET}')
  try:
    config = adm.ADMConfig.from_json(str(arrays.pop(CONFIG_KEY).item()))
  except (ValueError, TypeError, KeyError) as e:
    raise ADMWeightsError(
        f'{path}: unreadable {CONFIG_KEY!r} entry ({e}).') from None
  check_adm_arrays(arrays, config, path)
  return config, unflatten({k: jnp.asarray(v, jnp.float32)
                            for k, v in arrays.items()})


def is_npz(path):
  """Whether a teacher path names converted weights rather than a workdir."""
  return bool(path) and str(path).endswith('.npz')


def adm_network_params(path, abstract_params, sha256=''):
  """The parameters of an `adm.Network` from a `convert_adm` .npz: the
  U-Net's, under `adm.UNET`, checked name by name and shape by shape
  against `abstract_params`, those of the network the config builds."""
  _, raw = load_adm(path, sha256)
  params = {adm.UNET: raw}
  mismatch = describe_mismatch(flatten(params), shapes(abstract_params))
  if mismatch:
    raise ADMWeightsError(f'{path} does not fit config.model: {mismatch}.')
  return params
