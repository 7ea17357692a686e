"""Karras-form denoisers as v-prediction networks: the scalings against
their float64 formulas, the conventions pinned, and the exact toy2d
denoiser in Karras form sampling as the native exact teacher."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from multistep_cm import karras
from multistep_cm import samplers
from multistep_cm import schedules
from multistep_cm import toy2d

SIGMAS = np.geomspace(0.002, 80., 41)
LOGSNR = schedules.cosine_logsnr


def test_scalings_equal_their_float64_formulas():
  s, sd, smin = SIGMAS, 0.5, 0.002
  total = s**2 + sd**2
  want = {
      'edm': (sd**2 / total, s * sd / np.sqrt(total), 1 / np.sqrt(total)),
      'consistency': (sd**2 / ((s - smin)**2 + sd**2),
                      (s - smin) * sd / np.sqrt(total), 1 / np.sqrt(total))}
  got = {'edm': karras.edm_scalings(jnp.asarray(s, jnp.float32)),
         'consistency': karras.consistency_scalings(
             jnp.asarray(s, jnp.float32))}
  for name in want:
    for g, w in zip(got[name], want[name]):
      # c_out of the consistency form is 0 at sigma_min: absolute there.
      np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=1e-6,
                                 atol=1e-9)


def test_karras_schedule_is_edms_grid():
  """A uniform grid in t is EDM's sigma_i (Karras et al. eq. 5, rho 7, from
  0.002 to 80), in float64."""
  t = np.linspace(0., 1., 18)
  lo, hi = 0.002 ** (1 / 7), 80. ** (1 / 7)
  want = -2. * np.log((lo + t * (hi - lo)) ** 7)
  fn = schedules.get_logsnr_fn('karras', logsnr_min=-2. * np.log(80.),
                               logsnr_max=-2. * np.log(0.002), rho=7.)
  np.testing.assert_allclose(fn(jnp.asarray(t)), want, rtol=1e-5, atol=1e-5)
  # rho reaches the grid: 1 would be uniform in sigma.
  uniform = schedules.karras_logsnr(jnp.asarray(t), -2. * np.log(80.),
                                    -2. * np.log(0.002), rho=1.)
  np.testing.assert_allclose(
      np.exp(-0.5 * np.asarray(uniform)), 0.002 + t * (80. - 0.002),
      rtol=1e-5)


def test_conventions():
  sigma = jnp.float32(np.e**4)
  assert float(karras.TIME_INPUTS['edm'](sigma)) == pytest.approx(1.)
  assert float(karras.TIME_INPUTS['openai'](sigma)) == pytest.approx(1000.)
  # sigma is the noise-to-signal ratio: logSNR 0 is sigma 1, and lambda
  # falls as sigma grows.
  assert float(karras.sigma_of_logsnr(0.)) == 1.
  np.testing.assert_allclose(
      karras.sigma_of_logsnr(karras.logsnr_of_sigma(SIGMAS)), SIGMAS,
      rtol=1e-6)
  assert float(karras.logsnr_of_sigma(jnp.float32(np.e))) == pytest.approx(-2.)
  # The consistency form is the identity at sigma_min, whatever the network.
  d = karras.denoiser(lambda p, x, time, c, r: x + 7.,
                      karras.consistency_scalings, 'openai')
  x = jnp.linspace(-1., 1., 6).reshape(3, 2)
  np.testing.assert_allclose(d(None, x, jnp.full(3, karras.SIGMA_MIN)), x,
                             atol=1e-6)


def _mixture_denoiser(x, sigma):
  """E[data | data + sigma eps = x] of the toy2d mixture, in Karras form."""
  mu = jnp.asarray(toy2d.means(), jnp.float32)
  var = (toy2d.STD**2 + sigma**2)[:, None]
  diff = x[:, None] - mu[None]
  post = jax.nn.softmax(-0.5 * jnp.sum(diff**2, -1) / var, axis=-1)
  return jnp.sum(post[..., None] * (
      mu[None] + (toy2d.STD**2 / var)[..., None] * diff), axis=1)


def _edm_raw(params, x_in, time, cond, rng):
  """The raw network EDM's preconditioning would have to learn for the
  exact denoiser, told sigma by c_noise = ln(sigma) / 4."""
  del params, cond, rng
  sigma = jnp.exp(4. * time)
  c_skip, c_out, c_in = karras.edm_scalings(sigma)
  x = x_in / c_in[:, None]
  return (_mixture_denoiser(x, sigma) - c_skip[:, None] * x) / c_out[:, None]


def test_edm_form_of_the_exact_denoiser_samples_as_the_native_teacher():
  native = toy2d.exact_network(LOGSNR)
  wrapped = karras.v_network(karras.denoiser(_edm_raw), LOGSNR)
  z = jax.random.normal(jax.random.key(0), (64, 2))
  for t in (0.05, 0.3, 0.7, 0.95):
    tt = jnp.full(64, t)
    np.testing.assert_allclose(wrapped(None, z, tt), native(None, z, tt),
                               rtol=1e-4, atol=1e-4)
  noise = jax.random.normal(jax.random.key(1), (256, 2))
  labels = jnp.zeros(256, jnp.int32)
  for kind in ('ddim', 'addim'):
    ours, theirs = (samplers.diffusion_sample(net, None, noise, labels,
                                              LOGSNR, 32, kind=kind)
                    for net in (wrapped, native))
    # float32 round-off, grown along 32 steps where a path runs between two
    # components (the largest difference, 5e-4, is such a point).
    np.testing.assert_allclose(ours, theirs, atol=1e-3)
  # Told sigma in openai's units, the same raw network is far off.
  confused = karras.v_network(karras.denoiser(_edm_raw, time_input='openai'),
                              LOGSNR)
  tt = jnp.full(64, 0.3)
  assert not np.allclose(confused(None, z, tt), native(None, z, tt), atol=0.1)
