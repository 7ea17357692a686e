"""Sample-quality metrics for the embedded data: FD-digits, class accuracy,
and for toy2d a sliced Wasserstein distance and the mean true log-density."""

import numpy as np
import scipy.linalg

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
  covmean = np.real(covmean)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2)
               - 2. * np.trace(covmean))


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
