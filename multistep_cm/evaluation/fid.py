"""FID-family metrics of images: Inception features on the mesh, reference
statistics (the ADM reference batches, or computed from this project's own
input pipeline), the scores of a set of features against a reference, and
FID during training."""

import dataclasses
import functools
import hashlib
import io
import os
import time

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np

from multistep_cm import datasets
from multistep_cm.core import errors
from multistep_cm.core import generation
from multistep_cm.core import progress
from multistep_cm.core import sharding
from multistep_cm.core import state
from multistep_cm.evaluation import inception
from multistep_cm.evaluation import metrics

ADM_REFERENCES = ('https://openaipublic.blob.core.windows.net/diffusion/'
                  'jul-2021/ref_batches/imagenet/{64,128}/'
                  'VIRTUAL_imagenet{64,128}_labeled.npz')


class ReferenceError(errors.UserError):  # pylint: disable=redefined-builtin
  """Missing or unusable reference statistics."""


@dataclasses.dataclass
class Reference:
  path: str
  sha256: str
  mu: np.ndarray | None  # float64 pool_3 mean over the reference set.
  sigma: np.ndarray | None
  images: np.ndarray | None  # uint8 NHWC, for precision/recall (ADM: 10k).


def load_reference(path):
  """An ADM-layout reference .npz (local or gs://): `mu`/`sigma` when present
  (the ADM files hold full-train-set statistics), and `arr_0`, the images
  precision/recall compares with."""
  if not path:
    raise ReferenceError(
        'No FID reference: set config.evaluate.reference to an ADM reference '
        f'batch ({ADM_REFERENCES}) or to the output of --mode=reference.')
  try:
    blob = epath.Path(path).read_bytes()
  except (OSError, ValueError) as e:
    raise ReferenceError(f'Cannot read the FID reference {path} '
                         f'({type(e).__name__}).') from None
  try:
    with np.load(io.BytesIO(blob), allow_pickle=False) as f:
      got = {k: f[k] for k in f.files if k in ('mu', 'sigma', 'arr_0')}
  except (OSError, ValueError) as e:
    raise ReferenceError(f'{path} is not a readable .npz ({e}).') from None
  if 'mu' not in got and 'arr_0' not in got:
    raise ReferenceError(f'{path} has neither mu/sigma nor arr_0 images: not '
                         'an ADM-layout reference.')
  images = got.get('arr_0')
  if images is not None and (images.dtype != np.uint8 or images.ndim != 4):
    raise ReferenceError(f'{path}: arr_0 must be uint8 NHWC images, not '
                         f'{images.dtype} {images.shape}.')
  mu, sigma = got.get('mu'), got.get('sigma')
  return Reference(path, hashlib.sha256(blob).hexdigest(),
                   None if mu is None else mu.astype(np.float64),
                   None if sigma is None else sigma.astype(np.float64), images)


@functools.lru_cache(maxsize=4)
def make_feature_fn(mesh):
  """A jitted `(inception_params, uint8 images) -> (features, logits)` over
  the batch sharding: the weights replicated, each device its rows."""
  batch = sharding.batch_sharding(mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  return jax.jit(lambda p, x: inception.features_fn(p)(x),
                 in_shardings=(replicated, batch), out_shardings=batch)


def image_features(images, inception_params, mesh, batch_size):
  """(features, logits) of uint8 images held by every process, as numpy."""
  fn = make_feature_fn(mesh)
  feats, logits = [], []
  for _, batch, rows in sharding.padded_batches(
      images, sharding.mesh_batch_size(batch_size, mesh), mesh):
    f, l = fn(inception_params, batch)
    feats.append(sharding.to_host(f, rows))
    logits.append(sharding.to_host(l, rows))
  return np.concatenate(feats), np.concatenate(logits)


def reference_stats(ref, inception_params, mesh, batch_size):
  """(mu, sigma) of a reference: its own, or computed from its images."""
  if ref.mu is not None:
    return ref.mu, ref.sigma
  logging.info('%s has no mu/sigma; computing them from its %d images.',
               ref.path, len(ref.images))
  feats, _ = image_features(ref.images, inception_params, mesh, batch_size)
  return metrics.gaussian_stats(feats)


def scores(features, logits, mu_sigma, ref_features=None):
  """FID (float64 statistics, scipy sqrtm), IS over 10 splits, and
  precision/recall (k=3) when reference features are given."""
  stats = metrics.FeatureStats(features.shape[1])
  stats.add(features)
  out = {'fid': metrics.frechet_distance(*stats.mu_sigma(), *mu_sigma)}
  out['inception_score'], out['inception_score_std'] = (
      metrics.inception_score(logits))
  if ref_features is not None:
    out['precision'], out['recall'] = metrics.precision_recall(
        ref_features, features)
  return out


# ----------------------------------------------------------------------------
# --mode=reference: statistics of a dataset split through our own pipeline.
# ----------------------------------------------------------------------------


def compute_reference(config, workdir, split='train', keep_images=10_000):
  """Writes WORKDIR/reference_<dataset>_<split>.npz in the ADM layout: `mu`,
  `sigma` (float64, over the whole split) and `arr_0`, the first
  `keep_images` images (uint8) for precision/recall. Returns its path."""
  cfg = config.dataset
  if not datasets.get(config).images:
    raise ReferenceError(f'{cfg.name} has points, not images: no FID '
                         'statistics.')
  params = inception.load_params(config.evaluate.inception_weights,
                                 config.evaluate.inception_sha256)
  mesh = state.make_mesh(config)
  bs = sharding.mesh_batch_size(config.evaluate.batch_size, mesh)
  fn = make_feature_fn(mesh)
  stats = metrics.FeatureStats(inception.FEATURES)
  kept, n, t0 = [], 0, time.time()
  total = datasets.num_examples(config, split)
  local_keep = keep_images // jax.process_count()
  for i, (x, _, mask) in enumerate(datasets.one_pass(config, split, bs)):
    feats, _ = fn(params, sharding.global_batch(x, mesh))
    global_mask = np.asarray(multihost_utils.process_allgather(mask,
                                                               tiled=True))
    stats.add(feats, global_mask)
    have = sum(len(k) for k in kept)
    if have < local_keep:
      kept.append(x[mask][:local_keep - have])
    n += int(global_mask.sum())
    if (i + 1) % 20 == 0:
      rate = n / (time.time() - t0)
      logging.info('%d/%s images, %.1f images/s%s', n, total or '?', rate,
                   f', ETA {progress.format_eta((total - n) / rate)}'
                   if total else '')
  mu, sigma = stats.mu_sigma()  # Collective: every process calls it.
  images = np.asarray(multihost_utils.process_allgather(
      np.concatenate(kept), tiled=True))
  path = epath.Path(workdir) / f'reference_{cfg.name}_{split}.npz'
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open('wb') as f:
      np.savez(f, mu=mu, sigma=sigma, arr_0=images, num_images=np.int64(n))
  logging.info('Wrote %s: statistics of %d %s images, %d kept for '
               'precision/recall (%.0f s).', path, n, split, len(images),
               time.time() - t0)
  return os.fspath(path)


def load_weights_and_reference(config):
  """The Inception parameters and the reference file: read (and checked)
  before anything is sampled."""
  ev = config.evaluate
  return (inception.load_params(ev.inception_weights, ev.inception_sha256),
          load_reference(ev.reference))


def reference_features(ref, inception_params, mesh, config):
  """Features of the reference's images for precision/recall, or None."""
  if ref.images is None or not config.evaluate.precision_recall:
    return None
  return image_features(ref.images, inception_params, mesh,
                        config.evaluate.batch_size)[0]


def inception_outputs(params, images):
  """The Inception's pool_3 features and logits of uint8 images, as the
  outputs a `generation.Generator` adds to its samples."""
  features, logits = inception.features_fn(params)(images)
  return {'features': features, 'logits': logits}


class TrainingFID:
  """FID on `evaluate.train_samples` samples at each evaluation of a training
  run. The Inception runs in the sampler's jitted call, on the devices that
  hold the samples, so only 2048 floats per sample reach the host."""

  def __init__(self, config, network, param_shardings, mesh, spec):
    ev = config.evaluate
    self.params, ref = load_weights_and_reference(config)
    self.mu_sigma = reference_stats(ref, self.params, mesh, ev.batch_size)
    _, self.labels = generation.eval_inputs(config, ev.train_samples)
    self.seed, self.batch_size = config.seed + 3, ev.batch_size
    self.generator = generation.Generator(config, network, param_shardings,
                                          mesh, spec,
                                          features=inception_outputs)

  @staticmethod
  def enabled(config):
    ev = config.evaluate
    return (ev.train_samples > 0 and bool(ev.reference)
            and bool(inception.resolve_path(ev.inception_weights)))

  def __call__(self, params):
    stats = metrics.FeatureStats(inception.FEATURES)
    for out, rows in self.generator.batches(params, self.labels, self.seed,
                                            self.batch_size,
                                            feature_params=self.params):
      features = out['features']
      stats.add(features, np.arange(features.shape[0]) < rows)
    return metrics.frechet_distance(*stats.mu_sigma(), *self.mu_sigma)
