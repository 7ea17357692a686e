"""Noise schedules: logSNR as a function of diffusion time t in [0, 1].

The forward process is variance preserving, z_t = alpha_t x + sigma_t eps with
alpha_t^2 + sigma_t^2 = 1, and every schedule is written as lambda(t) = log SNR(t)
(spec section 1.2, following simple diffusion). t = 0 is data, t = 1 is noise.
"""

import jax
import jax.numpy as jnp


def cosine_logsnr(t, logsnr_min=-15., logsnr_max=15.):
  """Cosine schedule, clipped so that lambda(0) = logsnr_max, lambda(1) = logsnr_min.

  The clip keeps sigma_0 > 0 and alpha_1 > 0, so DDIM and inverse DDIM stay
  finite at both ends of the time grid.
  """
  t = jnp.asarray(t, jnp.float32)
  b = jnp.arctan(jnp.exp(-0.5 * logsnr_max))
  a = jnp.arctan(jnp.exp(-0.5 * logsnr_min))
  return -2. * jnp.log(jnp.tan(b + t * (a - b)))


def shifted_cosine_logsnr(t, image_size, noise_size, logsnr_min=-15.,
                          logsnr_max=15.):
  """Cosine schedule shifted so that resolution `image_size` sees the noise
  level a `noise_size` image would see under the plain cosine schedule."""
  shift = 2. * jnp.log(noise_size / image_size)
  return cosine_logsnr(t, logsnr_min, logsnr_max) + shift


def interpolated_cosine_logsnr(t, image_size, noise_size_low, noise_size_high,
                               logsnr_min=-15., logsnr_max=15.):
  """Interpolates from the `noise_size_high` shift at t = 0 to the (stronger)
  `noise_size_low` shift at t = 1, so the coarse structure gets the noise
  levels of a low-resolution image (the form of the public code ports)."""
  t = jnp.asarray(t, jnp.float32)
  low = shifted_cosine_logsnr(t, image_size, noise_size_low, logsnr_min,
                              logsnr_max)
  high = shifted_cosine_logsnr(t, image_size, noise_size_high, logsnr_min,
                               logsnr_max)
  return t * low + (1. - t) * high


def karras_logsnr(t, logsnr_min=-15., logsnr_max=15., rho=7.):
  """EDM's noise levels (Karras et al. 2022, eq. 5) as a schedule: sigma =
  exp(-lambda / 2) runs from sigma_min = exp(-logsnr_max / 2) at t = 0 to
  sigma_max = exp(-logsnr_min / 2) at t = 1, uniform in sigma^(1 / rho). A
  uniform grid in t is then EDM's (and the consistency models') time
  discretisation; rho = 7 is theirs."""
  t = jnp.asarray(t, jnp.float32)
  lo, hi = jnp.exp(-0.5 * logsnr_max / rho), jnp.exp(-0.5 * logsnr_min / rho)
  return -2. * rho * jnp.log(lo + t * (hi - lo))


def alpha_sigma(logsnr):
  """(alpha, sigma) with alpha^2 = sigmoid(lambda) and sigma^2 = sigmoid(-lambda).

  Going through the sigmoid rather than 1 - alpha^2 keeps sigma accurate when
  alpha is close to 1 (spec A7).
  """
  logsnr = jnp.asarray(logsnr, jnp.float32)
  return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


def get_logsnr_fn(kind, image_size=None, noise_size=None, noise_size_low=None,
                  noise_size_high=None, logsnr_min=-15., logsnr_max=15.,
                  rho=7.):
  """Returns `t -> logsnr` for a schedule named in a config."""
  kw = dict(logsnr_min=logsnr_min, logsnr_max=logsnr_max)
  if kind == 'cosine':
    return lambda t: cosine_logsnr(t, **kw)
  if kind == 'shifted_cosine':
    return lambda t: shifted_cosine_logsnr(t, image_size, noise_size, **kw)
  if kind == 'interpolated_cosine':
    return lambda t: interpolated_cosine_logsnr(t, image_size, noise_size_low,
                                                noise_size_high, **kw)
  if kind == 'karras':
    return lambda t: karras_logsnr(t, rho=rho, **kw)
  raise ValueError(f'Unknown schedule {kind!r}: expected one of cosine, '
                   'shifted_cosine, interpolated_cosine, karras.')
