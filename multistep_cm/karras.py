"""Denoisers in Karras form (EDM, openai's consistency models) as networks of
this framework: `(params, z_t, t, cond, rng) -> v` over a logSNR schedule.

A Karras-form denoiser D(x; sigma) sees the variance-exploding process
x = data + sigma eps. The variance-preserving z_t = alpha x + sigma_t eps of
logSNR lambda is that process scaled by alpha: sigma = sigma_t / alpha =
exp(-lambda / 2) and x = z_t / alpha. So x_hat = D(z_t / alpha; sigma), and
v = (alpha z_t - x_hat) / sigma_t. Data are in [-1, 1] in both.

A raw network F (e.g. the ADM U-Net) is wrapped as
D = c_skip x + c_out F(c_in x, time), with (Karras et al. 2022, Song et al.
2023):
  EDM:          c_skip = s_d^2 / (sigma^2 + s_d^2),
                c_out = sigma s_d / sqrt(sigma^2 + s_d^2);
  consistency:  c_skip = s_d^2 / ((sigma - sigma_min)^2 + s_d^2),
                c_out = (sigma - sigma_min) s_d / sqrt(sigma^2 + s_d^2);
  both:         c_in = 1 / sqrt(sigma^2 + s_d^2), s_d = sigma_data = 0.5.
The time input is EDM's c_noise = ln(sigma) / 4, or, for the same networks
in openai's code, 1000 times that: 250 ln(sigma).
"""

import jax.numpy as jnp

from multistep_cm import ddim
from multistep_cm import schedules

SIGMA_DATA = 0.5
SIGMA_MIN = 0.002  # The consistency models' boundary, sigma at t = epsilon.


def sigma_of_logsnr(logsnr):
  """The variance-exploding noise level of logSNR lambda: exp(-lambda / 2)."""
  return jnp.exp(-0.5 * logsnr)


def logsnr_of_sigma(sigma):
  return -2. * jnp.log(sigma)


# How the raw network is told sigma.
TIME_INPUTS = {
    'edm': lambda sigma: 0.25 * jnp.log(sigma),
    'openai': lambda sigma: 250. * jnp.log(sigma),
}


def edm_scalings(sigma, sigma_data=SIGMA_DATA):
  """(c_skip, c_out, c_in) of EDM's preconditioning."""
  total = sigma**2 + sigma_data**2
  return (sigma_data**2 / total, sigma * sigma_data / jnp.sqrt(total),
          1. / jnp.sqrt(total))


def consistency_scalings(sigma, sigma_min=SIGMA_MIN, sigma_data=SIGMA_DATA):
  """(c_skip, c_out, c_in) of the consistency models' output form: D is the
  identity at sigma_min."""
  total = sigma**2 + sigma_data**2
  return (sigma_data**2 / ((sigma - sigma_min)**2 + sigma_data**2),
          (sigma - sigma_min) * sigma_data / jnp.sqrt(total),
          1. / jnp.sqrt(total))


SCALINGS = {'edm': edm_scalings, 'consistency': consistency_scalings}


def denoiser(raw, scalings=edm_scalings, time_input='edm'):
  """D(params, x, sigma, cond, rng) from a raw network
  `raw(params, x_in, time, cond, rng)` (NHWC or (batch, dim) inputs, sigma
  of shape (batch,))."""
  to_time = TIME_INPUTS[time_input]

  def fn(params, x, sigma, cond=None, rng=None):
    c_skip, c_out, c_in = (ddim.expand(c, x) for c in scalings(sigma))
    out = raw(params, c_in * x, to_time(sigma), cond, rng)
    return c_skip * x + c_out * out.astype(x.dtype)
  return fn


def v_network(karras_denoiser, logsnr_fn):
  """This framework's `(params, z_t, t, cond, rng) -> v` from a Karras-form
  `karras_denoiser(params, x, sigma, cond, rng)`."""
  def fn(params, z, t, cond=None, rng=None):
    logsnr = jnp.broadcast_to(jnp.asarray(logsnr_fn(t), jnp.float32),
                              z.shape[:1])
    alpha, sigma_t = schedules.alpha_sigma(logsnr)
    x_hat = karras_denoiser(params, z / ddim.expand(alpha, z),
                            sigma_of_logsnr(logsnr), cond, rng)
    return ddim.v_from_x(x_hat, z, alpha, sigma_t)
  return fn
