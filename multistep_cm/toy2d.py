"""The toy2d data: a mixture of isotropic 2-D Gaussians with known density.

Eight equally weighted components on a circle of radius 2, standard deviation
0.15; the component index is the class label.
"""

import numpy as np
from scipy.special import logsumexp

NUM_CLASSES = 8
RADIUS = 2.
STD = 0.15


def means():
  angles = 2 * np.pi * np.arange(NUM_CLASSES) / NUM_CLASSES
  return RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=-1)


def sample(rng, n, labels=None):
  """n points (float32, (n, 2)) and their labels from a numpy Generator."""
  if labels is None:
    labels = rng.integers(0, NUM_CLASSES, n)
  x = means()[labels] + STD * rng.standard_normal((n, 2))
  return x.astype(np.float32), labels.astype(np.int32)


def log_density(x):
  """log p(x) of the mixture, in float64, for points of shape (n, 2)."""
  x = np.asarray(x, np.float64)
  d2 = np.sum((x[:, None, :] - means()[None]) ** 2, axis=-1)
  log_comp = -0.5 * d2 / STD**2 - np.log(2 * np.pi * STD**2)
  return logsumexp(log_comp, axis=1) - np.log(NUM_CLASSES)
