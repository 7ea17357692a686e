"""FID-family metrics of images: the feature networks (the FID Inception, and
DINOv2 ViT-L/14 for FD-DINOv2) on the mesh, reference statistics (the ADM
reference batches, EDM2's reference statistics, or computed from this
project's own input pipeline), the scores of a set of features against a
reference, and FID during training."""

import dataclasses
import functools
import hashlib
import io
import os
import pickle
import time

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np

from multistep_cm import errors
from multistep_cm import run as run_lib
from multistep_cm.core import generation
from multistep_cm.core import progress
from multistep_cm.core import sharding
from multistep_cm.datasets import base
from multistep_cm.evaluation import dinov2
from multistep_cm.evaluation import inception
from multistep_cm.evaluation import metrics

ADM_REFERENCES = ('https://openaipublic.blob.core.windows.net/diffusion/'
                  'jul-2021/ref_batches/imagenet/{64,128}/'
                  'VIRTUAL_imagenet{64,128}_labeled.npz')
EDM2_REFERENCES = ('https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/'
                   'img{64,512}.pkl')


class ReferenceError(errors.UserError):  # pylint: disable=redefined-builtin
  """Missing or unusable reference statistics."""


@dataclasses.dataclass
class Reference:
  path: str
  sha256: str
  # float64 (mu, sigma) per metric ('fid', 'fd_dinov2') the file holds; the
  # ADM files hold full-train-set FID statistics.
  stats: dict
  images: np.ndarray | None  # uint8 NHWC, for precision/recall (ADM: 10k).


# The npz entries of each metric's statistics ('fid': ADM's own names).
NPZ_KEYS = {'fid': ('mu', 'sigma'), 'fd_dinov2': ('dinov2_mu', 'dinov2_sigma')}


class _ArraysOnly(pickle.Unpickler):
  """Unpickles dicts, numbers, strings and numpy arrays, nothing else: an
  EDM2 reference file cannot run code."""
  ALLOWED = {(m, n) for m in ('numpy.core.multiarray', 'numpy._core.multiarray')
             for n in ('_reconstruct', 'scalar')} | {('numpy', 'ndarray'),
                                                      ('numpy', 'dtype')}

  def find_class(self, module, name):
    if (module, name) in self.ALLOWED:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f'{module}.{name} is not an array')


def _edm2_stats(blob, path):
  """{metric: (mu, sigma)} of an EDM2 reference .pkl: a dict of metrics
  ('fid', 'fd_dinov2'), each {'mu', 'sigma'}."""
  try:
    raw = _ArraysOnly(io.BytesIO(blob)).load()
  except Exception as e:  # pylint: disable=broad-except
    raise ReferenceError(f'{path} is not an EDM2 reference .pkl of arrays '
                         f'({type(e).__name__}: {e}).') from None
  if not isinstance(raw, dict):
    raise ReferenceError(f'{path}: not a dict of statistics.')
  stats = {}
  for metric in NPZ_KEYS:
    entry = raw.get(metric)
    if isinstance(entry, dict) and all(
        isinstance(entry.get(k), np.ndarray) for k in ('mu', 'sigma')):
      stats[metric] = (entry['mu'], entry['sigma'])
  if not stats:
    raise ReferenceError(f'{path} has no {" or ".join(NPZ_KEYS)} mu/sigma: '
                         'not an EDM2 reference.')
  return stats


def load_reference(path):
  """A reference (local or gs://): an ADM-layout .npz (`mu`/`sigma` when
  present, `arr_0`, the images precision/recall compares with), that of
  --mode=reference (which adds `dinov2_mu`/`dinov2_sigma` when DINOv2 is
  configured), or an EDM2 reference .pkl (statistics only), read without
  running any pickled code."""
  if not path:
    raise ReferenceError(
        'No FID reference: set config.evaluate.reference to an ADM reference '
        f'batch ({ADM_REFERENCES}), an EDM2 reference ({EDM2_REFERENCES}) or '
        'the output of --mode=reference.')
  try:
    blob = epath.Path(path).read_bytes()
  except (OSError, ValueError) as e:
    raise ReferenceError(f'Cannot read the FID reference {path} '
                         f'({type(e).__name__}).') from None
  images = None
  if str(path).endswith('.pkl'):
    stats = _edm2_stats(blob, path)
  else:
    try:
      with np.load(io.BytesIO(blob), allow_pickle=False) as f:
        stats = {m: (f[mu], f[sigma]) for m, (mu, sigma) in NPZ_KEYS.items()
                 if mu in f.files and sigma in f.files}
        images = f['arr_0'] if 'arr_0' in f.files else None
    except (OSError, ValueError) as e:
      raise ReferenceError(f'{path} is not a readable .npz ({e}).') from None
    if 'fid' not in stats and images is None:
      raise ReferenceError(f'{path} has neither mu/sigma nor arr_0 images: '
                           'not an ADM-layout reference.')
  if images is not None and (images.dtype != np.uint8 or images.ndim != 4):
    raise ReferenceError(f'{path}: arr_0 must be uint8 NHWC images, not '
                         f'{images.dtype} {images.shape}.')
  for metric, (mu, sigma) in stats.items():
    if mu.ndim != 1 or sigma.shape != mu.shape * 2:
      raise ReferenceError(f'{path}: {metric} statistics of shapes '
                           f'{mu.shape} and {sigma.shape}, not (d,), (d, d).')
  return Reference(path, hashlib.sha256(blob).hexdigest(),
                   {m: (mu.astype(np.float64), sigma.astype(np.float64))
                    for m, (mu, sigma) in stats.items()}, images)


class Detectors:
  """The feature networks run on uint8 images, their weights read and
  checked when built: the FID Inception always (FID, IS, precision/recall),
  and DINOv2 ViT-L/14 (FD-DINOv2) when `dinov2` (default: whenever
  config.evaluate.dinov2_weights is set). `outputs(params, images)` runs
  them all in one program, so one generation feeds every metric; `params`
  travels through jit as an argument."""

  def __init__(self, config, dinov2_on=None):
    ev = config.evaluate
    self.inception_weights = inception.FORMAT.resolve(ev.inception_weights)
    inception_params, self.inception_sha256 = inception.load_weights(
        ev.inception_weights, ev.inception_sha256)
    self.params = {'inception': inception_params}
    self.dinov2_weights = ev.get('dinov2_weights', '')
    self.dinov2_config = self.dinov2_sha256 = None
    if self.dinov2_weights and (dinov2_on is None or dinov2_on):
      self.params['dinov2'], self.dinov2_config, self.dinov2_sha256 = (
          dinov2.load_weights(self.dinov2_weights, ev.dinov2_sha256))

  @property
  def metrics(self):
    """The Frechet distances these features give: 'fid', 'fd_dinov2'."""
    return ('fid', 'fd_dinov2') if 'dinov2' in self.params else ('fid',)

  def outputs(self, params, images):
    out = inception_outputs(params['inception'], images)
    if 'dinov2' in params:
      out['dinov2'] = dinov2.features_fn(params['dinov2'],
                                         self.dinov2_config)(images)
    return out


# The output each metric's statistics are taken of.
FEATURES_OF = {'fid': 'features', 'fd_dinov2': 'dinov2'}


@functools.lru_cache(maxsize=8)
def make_feature_fn(mesh, fn=None):
  """A jitted `(params, uint8 images) -> outputs` of `fn` (default: the
  Inception's features and logits) over the batch sharding: the weights
  replicated, each device its rows."""
  batch = sharding.batch_sharding(mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  return jax.jit(fn or inception_outputs, in_shardings=(replicated, batch),
                 out_shardings=batch)


def image_outputs(images, params, mesh, batch_size, fn=None):
  """`fn`'s outputs (default: the Inception's {'features', 'logits'}) for
  uint8 images held by every process, as numpy."""
  fn = make_feature_fn(mesh, fn)
  out = []
  for _, batch, rows in sharding.padded_batches(
      images, sharding.mesh_batch_size(batch_size, mesh), mesh):
    out.append({k: sharding.to_host(v, rows)
                for k, v in fn(params, batch).items()})
  return {k: np.concatenate([o[k] for o in out]) for k in out[0]}


def image_features(images, inception_params, mesh, batch_size):
  """(features, logits) of the FID Inception for uint8 images held by every
  process, as numpy."""
  out = image_outputs(images, inception_params, mesh, batch_size)
  return out['features'], out['logits']


def reference_stats(ref, detectors, mesh, batch_size):
  """{metric: (mu, sigma)} of a reference for each of the detectors'
  metrics: its own, or computed from its images."""
  missing = [m for m in detectors.metrics if m not in ref.stats]
  if not missing:
    return {m: ref.stats[m] for m in detectors.metrics}
  if ref.images is None:
    raise ReferenceError(
        f'{ref.path} has no {", ".join(missing)} statistics and no images to '
        'compute them from: use --mode=reference with the same feature '
        'networks configured.')
  logging.info('%s has no %s statistics; computing them from its %d images.',
               ref.path, '/'.join(missing), len(ref.images))
  out = image_outputs(ref.images, detectors.params, mesh, batch_size,
                      detectors.outputs)
  return {**{m: ref.stats[m] for m in detectors.metrics if m in ref.stats},
          **{m: metrics.gaussian_stats(out[FEATURES_OF[m]]) for m in missing}}


def scores(outputs, ref_stats, ref_features=None):
  """FID (float64 statistics, scipy sqrtm), FD-DINOv2 where `ref_stats` has
  it, IS over 10 splits, and precision/recall (k=3) when reference features
  are given."""
  out = {}
  for metric, (mu, sigma) in ref_stats.items():
    feats = outputs[FEATURES_OF[metric]]
    stats = metrics.FeatureStats(feats.shape[1])
    stats.add(feats)
    out[metric] = metrics.frechet_distance(*stats.mu_sigma(), mu, sigma)
  out['inception_score'], out['inception_score_std'] = (
      metrics.inception_score(outputs['logits']))
  if ref_features is not None:
    out['precision'], out['recall'] = metrics.precision_recall(
        ref_features, outputs['features'])
  return out


# ----------------------------------------------------------------------------
# --mode=reference: statistics of a dataset split through our own pipeline.
# ----------------------------------------------------------------------------


def compute_reference(config, workdir, split='train', keep_images=10_000):
  """Writes WORKDIR/reference_<dataset>_<split>.npz in the ADM layout: `mu`,
  `sigma` (float64, over the whole split), `dinov2_mu` and `dinov2_sigma`
  when config.evaluate.dinov2_weights is set (the same pass), and `arr_0`,
  the first `keep_images` images (uint8) for precision/recall. Returns its
  path. `config`: or its `run.Run`."""
  run = run_lib.of(config)
  config, mesh, dataset = run.config, run.mesh, run.dataset
  cfg = config.dataset
  if not dataset.images:
    raise ReferenceError(f'{cfg.name} has points, not images: no FID '
                         'statistics.')
  detectors = Detectors(config)
  bs = sharding.mesh_batch_size(config.evaluate.batch_size, mesh)
  fn = make_feature_fn(mesh, detectors.outputs)
  stats = {m: None for m in detectors.metrics}
  kept, n, t0 = [], 0, time.time()
  total = dataset.num_examples(split)
  local_keep = keep_images // jax.process_count()
  for i, (x, _, mask) in enumerate(base.one_pass(dataset, split, bs)):
    out = fn(detectors.params, sharding.global_batch(x, mesh))
    global_mask = np.asarray(multihost_utils.process_allgather(mask,
                                                               tiled=True))
    for m in stats:
      feats = out[FEATURES_OF[m]]
      stats[m] = stats[m] or metrics.FeatureStats(feats.shape[1])
      stats[m].add(feats, global_mask)
    have = sum(len(k) for k in kept)
    if have < local_keep:
      kept.append(x[mask][:local_keep - have])
    n += int(global_mask.sum())
    if (i + 1) % 20 == 0:
      rate = n / (time.time() - t0)
      logging.info('%d/%s images, %.1f images/s%s', n, total or '?', rate,
                   f', ETA {progress.format_eta((total - n) / rate)}'
                   if total else '')
  arrays = {}
  for m, s in stats.items():  # Collective: every process calls mu_sigma.
    mu_key, sigma_key = NPZ_KEYS[m]
    arrays[mu_key], arrays[sigma_key] = s.mu_sigma()
  images = np.asarray(multihost_utils.process_allgather(
      np.concatenate(kept), tiled=True))
  path = epath.Path(workdir) / f'reference_{cfg.name}_{split}.npz'
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open('wb') as f:
      np.savez(f, **arrays, arr_0=images, num_images=np.int64(n))
  logging.info('Wrote %s: %s statistics of %d %s images, %d kept for '
               'precision/recall (%.0f s).', path, '/'.join(stats), n, split,
               len(images), time.time() - t0)
  return os.fspath(path)


def reference_features(ref, detectors, mesh, config):
  """Inception features of the reference's images for precision/recall, or
  None."""
  if ref.images is None or not config.evaluate.precision_recall:
    return None
  return image_features(ref.images, detectors.params['inception'], mesh,
                        config.evaluate.batch_size)[0]


def inception_outputs(params, images):
  """The Inception's pool_3 features and logits of uint8 images, as the
  outputs a `generation.Generator` adds to its samples."""
  features, logits = inception.features_fn(params)(images)
  return {'features': features, 'logits': logits}


class TrainingFID:
  """FID (and FD-DINOv2 with config.evaluate.train_dinov2) on
  `evaluate.train_samples` samples at each evaluation of a training run. The
  feature networks run in the sampler's jitted call, on the devices that
  hold the samples, so only the features reach the host."""

  def __init__(self, run, param_shardings, spec):
    config, mesh = run.config, run.mesh
    ev = config.evaluate
    self.detectors = Detectors(config, dinov2_on=ev.get('train_dinov2'))
    ref = load_reference(ev.reference)
    self.ref_stats = reference_stats(ref, self.detectors, mesh, ev.batch_size)
    _, self.labels = generation.eval_inputs(run.dataset, ev.train_samples)
    self.seed, self.batch_size = config.seed + 3, ev.batch_size
    self.generator = generation.Generator(run, param_shardings, spec,
                                          features=self.detectors.outputs)

  @staticmethod
  def enabled(config):
    ev = config.evaluate
    return (ev.train_samples > 0 and bool(ev.reference)
            and bool(inception.FORMAT.resolve(ev.inception_weights)))

  def __call__(self, params):
    """{'fid': ..., and 'fd_dinov2' where on}."""
    stats = {m: None for m in self.ref_stats}
    for out, rows in self.generator.batches(params, self.labels, self.seed,
                                            self.batch_size,
                                            feature_params=self.detectors.params):
      for m in stats:
        feats = out[FEATURES_OF[m]]
        stats[m] = stats[m] or metrics.FeatureStats(feats.shape[1])
        stats[m].add(feats, np.arange(feats.shape[0]) < rows)
    return {m: metrics.frechet_distance(*s.mu_sigma(), *self.ref_stats[m])
            for m, s in stats.items()}
