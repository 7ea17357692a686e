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


def exact_network(logsnr_fn):
  """The optimal denoiser of the (unconditional) mixture, in closed form, as a
  network `(params, z_t, t, cond, rng) -> v`: an exact teacher.

  z_t | k ~ N(alpha mu_k, (alpha^2 s^2 + sigma^2) I), so E[x | z_t] is the
  posterior-weighted sum of mu_k + alpha s^2 (z_t - alpha mu_k) /
  (alpha^2 s^2 + sigma^2). Labels are ignored.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from multistep_cm import schedules  # pylint: disable=g-import-not-at-top
  mu = jnp.asarray(means(), jnp.float32)

  def fn(params, z, t, cond=None, rng=None):
    del params, cond, rng
    alpha, sigma = schedules.alpha_sigma(logsnr_fn(t))
    alpha = jnp.broadcast_to(alpha, z.shape[:1])[:, None, None]
    sigma = jnp.broadcast_to(sigma, z.shape[:1])[:, None, None]
    var = alpha**2 * STD**2 + sigma**2
    diff = z[:, None, :] - alpha * mu[None]  # (batch, K, 2)
    logits = -0.5 * jnp.sum(diff**2, axis=-1) / var[..., 0]
    post = jax.nn.softmax(logits, axis=-1)[..., None]
    x = jnp.sum(post * (mu[None] + alpha * STD**2 * diff / var), axis=1)
    return (alpha[:, 0] * z - x) / sigma[:, 0]

  return fn
