"""Training losses. Networks enter as plain functions
`(params, z_t, t, labels, rng) -> v_prediction` (see `models.network_fn`)."""

import jax
import jax.numpy as jnp

from multistep_cm import schedules


def _mean_per_example(x):
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _avg_pool2(x):
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def drop_labels(rng, labels, rate, num_classes):
  """Replaces a fraction `rate` of labels by the null label `num_classes`, so
  one network learns the conditional and unconditional model (for guidance)."""
  if not num_classes or rate == 0.:
    return labels
  keep = jax.random.bernoulli(rng, 1. - rate, labels.shape)
  return jnp.where(keep, labels, num_classes)


def diffusion_loss(network, params, x, labels, rng, logsnr_fn,
                   label_dropout=0., num_classes=0, multiscale=False):
  """Continuous-time diffusion loss with t ~ U(0, 1) and the v-loss weighting.

  (SNR(t) + 1) ||x_hat - x||^2 equals ||v_hat - v||^2 exactly, so the loss is
  the mean squared v error. With `multiscale`, the error is also measured
  after one 2x2 average pool and the two per-pixel means are averaged (simple
  diffusion's multiscale loss with one extra level); the pooled error is the
  error of the pooled v because pooling is linear.

  Returns the scalar loss averaged over the batch.
  """
  k_t, k_eps, k_label, k_drop = jax.random.split(rng, 4)
  x = x.astype(jnp.float32)
  batch = x.shape[0]
  t = jax.random.uniform(k_t, (batch,))
  eps = jax.random.normal(k_eps, x.shape)
  alpha, sigma = schedules.alpha_sigma(logsnr_fn(t))
  a = alpha.reshape((batch,) + (1,) * (x.ndim - 1))
  s = sigma.reshape(a.shape)
  z_t = a * x + s * eps
  labels = drop_labels(k_label, labels, label_dropout, num_classes)
  v_err = network(params, z_t, t, labels, k_drop) - (a * eps - s * x)
  loss = _mean_per_example(jnp.square(v_err))
  if multiscale:
    loss = 0.5 * (loss + _mean_per_example(jnp.square(_avg_pool2(v_err))))
  return jnp.mean(loss)
