"""Converted weights of imported networks: `.npz` files of float32 arrays
named like the network's parameters ('a/b/c'), with the network's config as
JSON under CONFIG_KEY where it has one, written by a converter in `tools/`.

Each imported network declares its `Format`; reading, checking and writing
are the same for all. Nothing is ever downloaded or unpickled.
"""

import dataclasses
import functools
import hashlib
import io
import os
from typing import Any, Callable, NamedTuple, Optional
import zipfile

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from multistep_cm import errors

CONFIG_KEY = '__config__'  # The .npz entry that holds the config's JSON.


class WeightsError(errors.UserError):
  """Missing, unreadable or mismatched weights of an imported network, or a
  source model this port does not implement."""


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


def is_npz(path):
  """Whether a path names converted weights rather than a workdir."""
  return bool(path) and str(path).endswith('.npz')


def read_npz(path, sha256, what, hint=''):
  """(arrays, SHA-256) of an .npz (local or gs://), never unpickled, its
  digest checked when one is given; every failure is one WeightsError line
  naming `what` the file should hold, followed by `hint` where it says how
  to get one."""
  tail = f' {hint}' if hint else ''
  try:
    blob = epath.Path(path).read_bytes()
  except (OSError, ValueError) as e:  # tf.errors.NotFoundError is an OSError.
    raise WeightsError(f'Cannot read {what} {path} ({type(e).__name__}).'
                       f'{tail}') from None
  digest = hashlib.sha256(blob).hexdigest()
  if sha256 and digest != sha256.lower():
    raise WeightsError(f'{path} has SHA-256 {digest}, not the expected '
                       f'{sha256}: a different or damaged file.{tail}')
  try:
    with np.load(io.BytesIO(blob), allow_pickle=False) as f:
      return {k: f[k] for k in f.files}, digest
  except (OSError, ValueError) as e:
    raise WeightsError(f'{path} is not a readable .npz ({e}).{tail}') from None


def write_npz(path, arrays):
  """np.savez with fixed member timestamps and order, so the same weights
  always give the same bytes (and SHA-256)."""
  with epath.Path(path).open('wb') as raw, zipfile.ZipFile(
      raw, 'w', zipfile.ZIP_STORED) as zf:
    for name in sorted(arrays):
      buf = io.BytesIO()
      np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]),
                                allow_pickle=False)
      zf.writestr(zipfile.ZipInfo(name + '.npy', (1980, 1, 1, 0, 0, 0)),
                  buf.getvalue())


def sha256_of(path):
  h = hashlib.sha256()
  with epath.Path(path).open('rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


class Weights(NamedTuple):
  params: dict  # Nested, of float32 jnp arrays.
  config: Any  # The Format's config_type, or None.
  sha256: str  # Of the file read.


@functools.lru_cache(maxsize=16)
def _param_shapes(param_shapes, config):
  # Tracing a network's shapes takes seconds: converters check twice.
  return param_shapes() if config is None else param_shapes(config)


@dataclasses.dataclass(frozen=True)
class Format:
  """What is particular to one network's converted weights.

  `param_shapes(config)` (or `param_shapes()` when `config_type` is None)
  gives {'a/b/c': shape}; `config_type` has `to_json()` and
  `from_json(text)`; `where` is the phrase after the file's name in a
  mismatch, `{config}` standing for the config.
  """
  what: str  # E.g. 'Inception weights'.
  how_to_get: str  # One sentence: where to get them, and the converter.
  converter: str  # Its module's name, e.g. 'convert_inception'.
  param_shapes: Callable[..., dict]
  config_type: Optional[type] = None
  env: str = ''  # A variable naming the file when none is given.
  where: str = 'does not match the network'

  def resolve(self, path=''):
    """`path`, or the file `env` names when it is empty."""
    return str(path or (os.environ.get(self.env, '') if self.env else ''))

  def check(self, arrays, config=None, source='The state dict', hint=''):
    """Raises one WeightsError line unless `arrays` has exactly the names
    and shapes of the network for `config`."""
    mismatch = describe_mismatch(arrays,
                                 _param_shapes(self.param_shapes, config))
    if mismatch:
      tail = f' {hint}' if hint else ''
      raise WeightsError(f'{source} {self.where.format(config=config)}: '
                         f'{mismatch}.{tail}')

  @functools.lru_cache(maxsize=8)
  def load(self, path='', sha256=''):
    """Weights(params, config, sha256) of a converted .npz (local or gs://;
    the file `env` names when `path` is empty), its SHA-256 checked when
    one is given."""
    path = self.resolve(path)
    if not path:
      raise WeightsError(f'No {self.what} configured. {self.how_to_get}')
    arrays, digest = read_npz(path, sha256, self.what, self.how_to_get)
    config = None
    if self.config_type is not None:
      if CONFIG_KEY not in arrays:
        raise WeightsError(
            f'{path} has no {CONFIG_KEY!r} entry: not written by '
            f'{self.converter}. {self.how_to_get}')
      try:
        config = self.config_type.from_json(
            str(np.asarray(arrays.pop(CONFIG_KEY)).item()))
      except (ValueError, TypeError, KeyError) as e:
        raise WeightsError(
            f'{path}: unreadable {CONFIG_KEY!r} entry ({e}).') from None
    self.check(arrays, config, path, self.how_to_get)
    params = unflatten({k: jnp.asarray(v, jnp.float32)
                        for k, v in arrays.items()})
    return Weights(params, config, digest)

  def write(self, path, arrays, config=None):
    """Writes `arrays` ({'a/b/c': array}, checked first) and `config` to
    the .npz `path`, byte for byte the same for the same input; returns its
    SHA-256."""
    self.check(arrays, config)
    if config is not None:
      arrays = {**arrays, CONFIG_KEY: np.array([config.to_json()])}
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_npz(path, arrays)
    return sha256_of(path)
