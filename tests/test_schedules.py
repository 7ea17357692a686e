import jax
import jax.numpy as jnp
import numpy as np
import pytest

from multistep_cm import schedules


def test_cosine_known_points():
  # The clipped cosine hits its clip values at the ends and 0 halfway, where
  # the two arctans sum to pi/2.
  np.testing.assert_allclose(schedules.cosine_logsnr(0.), 15., rtol=1e-5)
  np.testing.assert_allclose(schedules.cosine_logsnr(1.), -15., rtol=1e-5)
  np.testing.assert_allclose(schedules.cosine_logsnr(0.5), 0., atol=1e-5)
  np.testing.assert_allclose(schedules.cosine_logsnr(0., -10., 10.), 10.,
                             rtol=1e-5)


def test_cosine_matches_alpha_cos_without_clipping():
  # With a wide clip the schedule is the textbook alpha = cos(pi t / 2):
  # logsnr = -2 log tan(pi t / 2).
  t = np.linspace(0.1, 0.9, 9)
  expected = -2 * np.log(np.tan(np.pi * t / 2))
  np.testing.assert_allclose(schedules.cosine_logsnr(t, -60., 60.), expected,
                             atol=1e-4)


def test_shifted_and_interpolated():
  t = jnp.linspace(0., 1., 11)
  base = schedules.cosine_logsnr(t)
  np.testing.assert_allclose(
      schedules.shifted_cosine_logsnr(t, 64, 32), base + 2 * np.log(0.5),
      atol=1e-5)
  interp = schedules.interpolated_cosine_logsnr(t, 128, 32, 128)
  # t = 0: the high-resolution (unshifted) end; t = 1: the 32/128 shift.
  np.testing.assert_allclose(interp[0], 15., atol=1e-4)
  np.testing.assert_allclose(interp[-1], -15. + 2 * np.log(32 / 128), atol=1e-4)
  np.testing.assert_allclose(
      interp[5], 0.5 * (base[5] + 2 * np.log(0.25)) + 0.5 * base[5], atol=1e-5)


@pytest.mark.parametrize('fn', [
    lambda t: schedules.cosine_logsnr(t),
    lambda t: schedules.shifted_cosine_logsnr(t, 64, 32),
    lambda t: schedules.interpolated_cosine_logsnr(t, 64, 32, 64),
    lambda t: schedules.interpolated_cosine_logsnr(t, 512, 32, 512),
])
def test_monotone_and_finite(fn):
  t = jnp.linspace(0., 1., 2049)
  lam = fn(t)
  assert np.all(np.isfinite(lam))
  assert np.all(np.diff(np.asarray(lam)) < 0)
  alpha, sigma = schedules.alpha_sigma(lam)
  assert np.all(alpha > 0) and np.all(sigma > 0)
  np.testing.assert_allclose(alpha**2 + sigma**2, 1., atol=1e-6)


def test_alpha_sigma_values():
  alpha, sigma = schedules.alpha_sigma(jnp.array([0., np.log(3.)]))
  np.testing.assert_allclose(alpha, [np.sqrt(.5), np.sqrt(.75)], rtol=1e-6)
  np.testing.assert_allclose(sigma, [np.sqrt(.5), np.sqrt(.25)], rtol=1e-6)
  # Accurate sigma near alpha = 1, where 1 - alpha^2 would cancel.
  _, sigma = schedules.alpha_sigma(jnp.float32(15.))
  np.testing.assert_allclose(sigma, np.sqrt(1 / (1 + np.exp(15.))), rtol=1e-5)


def test_unknown_schedule():
  with pytest.raises(ValueError, match='Unknown schedule'):
    schedules.get_logsnr_fn('cosin')


def test_jittable():
  out = jax.jit(schedules.interpolated_cosine_logsnr,
                static_argnums=(1, 2, 3))(0.3, 64, 32, 64)
  assert out.dtype == jnp.float32
