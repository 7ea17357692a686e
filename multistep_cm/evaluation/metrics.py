"""Sample-quality metrics: Frechet distance (FID, FD-digits) from float64
feature statistics, Inception Score, precision/recall, and for toy2d a sliced
Wasserstein distance and the mean true log-density."""

import functools

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.special

from multistep_cm import toy2d


def gaussian_stats(features):
  """Mean and covariance of (n, d) features, in float64."""
  f = np.asarray(features, np.float64)
  return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
  """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

  The square root can pick up a tiny imaginary part from round-off, and a
  singular product can make it fail; the usual remedy is a small diagonal
  offset.
  """
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * 1e-6
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    worst = np.max(np.abs(np.diagonal(covmean).imag))
    if worst > 1e-3:  # The TTUR/ADM threshold: beyond it the result is noise.
      raise ValueError(f'Frechet distance: matrix square root has imaginary '
                       f'component {worst:.3g}; the covariances are unusable.')
    covmean = covmean.real
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
               - 2. * np.trace(covmean))


class FeatureStats:
  """Running count, sum and sum of outer products of features, in float64.

  `add` takes numpy features, or a jax.Array sharded over devices and hosts:
  each process then adds the shards it holds (once each, whatever the
  replication) and `mu_sigma` sums the processes' totals exactly. float32
  features multiply exactly in float64, so the result does not depend on how
  the batch was split (to ~1e-15).
  """

  def __init__(self, dim):
    self.n = 0
    self.sum = np.zeros(dim)
    self.outer = np.zeros((dim, dim))

  def _add(self, f):
    f = np.asarray(f, np.float64)
    self.n += len(f)
    self.sum += f.sum(axis=0)
    self.outer += f.T @ f

  def add(self, features, mask=None):
    """`mask` (global, one bool per row) drops padding rows."""
    mask = None if mask is None else np.asarray(mask, bool)
    if not isinstance(features, jax.Array):
      self._add(features if mask is None else np.asarray(features)[mask])
      return
    for shard in features.addressable_shards:
      if shard.replica_id:
        continue
      f = np.asarray(shard.data)
      self._add(f if mask is None else f[mask[shard.index[0]]])

  def totals(self):
    """(n, sum, outer) over all processes."""
    if jax.process_count() == 1:
      return self.n, self.sum, self.outer
    # Exchanged as raw bits: float64 cannot travel through jax arrays without
    # x64 mode, and a float32 round trip would lose the accumulation's point.
    parts = [np.array([float(self.n)]), self.sum, self.outer.ravel()]
    flat = np.concatenate(parts).view(np.uint32)
    every = np.asarray(multihost_utils.process_allgather(flat))
    total = every.reshape(jax.process_count(), -1).copy().view(
        np.float64).sum(axis=0)
    d = len(self.sum)
    return int(round(total[0])), total[1:1 + d], total[1 + d:].reshape(d, d)

  def mu_sigma(self):
    n, s, outer = self.totals()
    if n < 2:
      raise ValueError(f'Feature statistics need at least 2 samples, got {n}.')
    mu = s / n
    return mu, (outer - n * np.outer(mu, mu)) / (n - 1)


def inception_score(logits, splits=10):
  """(mean, std) over `splits` equal parts of exp(E_x KL(p(y|x) || p(y))):
  the improved-GAN formula, as the ADM evaluator computes it (10 splits of
  5000 for 50k samples). Fewer samples than splits: one split per sample,
  rather than empty splits' NaN."""
  logits = np.asarray(logits, np.float64)
  logp = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
  scores = []
  for part in np.array_split(logp, min(splits, len(logp))):
    log_py = scipy.special.logsumexp(part, axis=0) - np.log(len(part))
    kl = np.sum(np.exp(part) * (part - log_py), axis=1)
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores)), float(np.std(scores))


@functools.partial(jax.jit, static_argnames='k')
def _kth_neighbour(rows, points, k):
  """Squared distance from each row to its k-th nearest point, the row itself
  (distance 0) not counted."""
  d = _sq_distances(rows, points)
  return -jax.lax.top_k(-d, k + 1)[0][:, k]


@jax.jit
def _inside(rows, points, radii):
  """Whether each row lies within the radius of some point."""
  return jnp.any(_sq_distances(rows, points) <= radii[None, :], axis=1)


def _sq_distances(a, b):
  hp = jax.lax.Precision.HIGHEST
  ab = jnp.dot(a, b.T, precision=hp)
  d = jnp.sum(a * a, 1)[:, None] - 2. * ab + jnp.sum(b * b, 1)[None, :]
  return jnp.maximum(d, 0.)


def _blocked(fn, rows, *args, block):
  """fn over row blocks of a fixed size (the last one padded), so each
  (shape, block) compiles once."""
  n = len(rows)
  out = []
  for i in range(0, n, block):
    chunk = rows[i:i + block]
    padded = np.pad(chunk, ((0, block - len(chunk)), (0, 0)))
    out.append(np.asarray(fn(padded, *args))[:len(chunk)])
  return np.concatenate(out)


def precision_recall(real, fake, k=3, block=1024):
  """Improved precision and recall (Kynkaenniemi et al. 2019) with k-NN
  manifolds: precision is the fraction of `fake` inside the real manifold
  (the union of balls reaching each real point's k-th neighbour), recall the
  fraction of `real` inside the fake one. ADM's evaluator uses pool_3
  features, its 10k reference images and all samples."""
  real = jnp.asarray(real, jnp.float32)
  fake = jnp.asarray(fake, jnp.float32)
  real_r = _blocked(functools.partial(_kth_neighbour, k=k), np.asarray(real),
                    real, block=block)
  fake_r = _blocked(functools.partial(_kth_neighbour, k=k), np.asarray(fake),
                    fake, block=block)
  precision = _blocked(_inside, np.asarray(fake), real, jnp.asarray(real_r),
                       block=block).mean()
  recall = _blocked(_inside, np.asarray(real), fake, jnp.asarray(fake_r),
                    block=block).mean()
  return float(precision), float(recall)


def sliced_wasserstein(a, b, num_projections=256, seed=0):
  """Sliced 2-Wasserstein distance between two equal-size point sets."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  n = min(len(a), len(b))
  dirs = np.random.default_rng(seed).standard_normal((a.shape[1],
                                                      num_projections))
  dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
  pa = np.sort(a[:n] @ dirs, axis=0)
  pb = np.sort(b[:n] @ dirs, axis=0)
  return float(np.sqrt(np.mean((pa - pb) ** 2)))


def toy2d_metrics(samples, seed=1):
  """Distance to fresh samples of the true mixture, and mean log-density."""
  ref, _ = toy2d.sample(np.random.default_rng(seed), len(samples))
  return {'swd': sliced_wasserstein(samples, ref),
          'log_density': float(np.mean(toy2d.log_density(samples)))}


def toy2d_floor(n, seed=2):
  """The metrics of true samples: what a perfect model would score."""
  x, _ = toy2d.sample(np.random.default_rng(seed), n)
  return toy2d_metrics(x)
