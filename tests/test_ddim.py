import jax
import jax.numpy as jnp
import numpy as np
import pytest

from multistep_cm import ddim
from multistep_cm import schedules

B = 4


def _coefs(t, s):
  a_t, s_t = schedules.alpha_sigma(schedules.cosine_logsnr(t))
  a_s, s_s = schedules.alpha_sigma(schedules.cosine_logsnr(s))
  return a_t, s_t, a_s, s_s


def _data(shape, seed=0):
  kx, ke = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kx, shape), jax.random.normal(ke, shape)


@pytest.mark.parametrize('shape', [(B, 8, 8, 3), (B, 3, 8, 8), (B, 2)])
def test_ddim_of_true_x_is_the_forward_process(shape):
  # With the true x, the implied eps is the true eps, so DDIM lands on
  # alpha_s x + sigma_s eps with the same eps.
  x, eps = _data(shape)
  t = jnp.linspace(0.3, 0.9, B)
  a_t, s_t, a_s, s_s = _coefs(t, t - 0.2)
  e = lambda c: c.reshape((B,) + (1,) * (len(shape) - 1))
  z_t = e(a_t) * x + e(s_t) * eps
  z_s = ddim.ddim_step(x, z_t, a_t, s_t, a_s, s_s)
  np.testing.assert_allclose(z_s, e(a_s) * x + e(s_s) * eps, atol=1e-5)


@pytest.mark.parametrize('shape', [(B, 8, 8, 3), (B, 3, 8, 8), (B, 2)])
def test_inverse_ddim_round_trip(shape):
  x, z_t = _data(shape, 1)
  t = jnp.array([0.2, 0.5, 0.8, 1.0])
  coefs = _coefs(t, t - 1. / 64)
  z_s = ddim.ddim_step(x, z_t, *coefs)
  np.testing.assert_allclose(ddim.inverse_ddim(z_s, z_t, *coefs), x, atol=2e-3)
  # And the other way: DDIM of the inverted x reproduces the target.
  target = z_s + 0.1
  x_inv = ddim.inverse_ddim(target, z_t, *coefs)
  np.testing.assert_allclose(ddim.ddim_step(x_inv, z_t, *coefs), target,
                             atol=1e-5)


def test_scalar_coefficients():
  x, z_t = _data((B, 5))
  coefs = _coefs(0.7, 0.6)
  per_example = [jnp.full((B,), c) for c in coefs]
  np.testing.assert_allclose(ddim.ddim_step(x, z_t, *coefs),
                             ddim.ddim_step(x, z_t, *per_example), atol=1e-6)


def test_float32_whatever_the_input_dtype():
  x, z_t = _data((B, 8, 8, 3))
  out = ddim.inverse_ddim(z_t.astype(jnp.bfloat16), x.astype(jnp.bfloat16),
                          *_coefs(0.5, 0.49))
  assert out.dtype == jnp.float32


def test_addim_equals_ddim_without_variance():
  x, z_t = _data((B, 8, 8, 3), 2)
  coefs = _coefs(jnp.linspace(0.2, 1., B), jnp.linspace(0.1, 0.9, B))
  np.testing.assert_allclose(ddim.addim_step(x, z_t, *coefs, jnp.zeros(B)),
                             ddim.ddim_step(x, z_t, *coefs), atol=1e-5)


def _addim_reference(x, z_t, a_t, s_t, a_s, s_s, x_var):
  """Paper eq. 14 written out per example in float64 numpy."""
  out = []
  for i in range(len(x)):
    eps = (z_t[i] - a_t[i] * x[i]) / s_t[i]
    c = a_s[i] - a_t[i] * s_s[i] / s_t[i]
    zeta = c**2 * x_var[i]
    scale = np.sqrt(s_s[i]**2 + zeta * eps.size / np.sum(eps**2))
    out.append(a_s[i] * x[i] + scale * eps)
  return np.stack(out)


def test_addim_matches_per_example_formula():
  x, z_t = _data((B, 4, 4, 3), 3)
  z_t = z_t * jnp.array([0.5, 1., 2., 4.])[:, None, None, None]
  coefs = _coefs(jnp.linspace(0.3, 1., B), jnp.linspace(0.2, 0.9, B))
  x_var = jnp.array([0.01, 0.1, 0.3, 0.5])
  got = ddim.addim_step(x, z_t, *coefs, x_var)
  want = _addim_reference(*(np.asarray(a, np.float64) for a in
                            (x, z_t, *coefs, x_var)))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_addim_norm_is_per_example():
  # Changing one example must not change the others' steps.
  x, z_t = _data((B, 4, 4, 3), 4)
  coefs = _coefs(0.8, 0.7)
  x_var = jnp.full((B,), 0.2)
  before = ddim.addim_step(x, z_t, *coefs, x_var)
  after = ddim.addim_step(x, z_t.at[0].multiply(10.), *coefs, x_var)
  np.testing.assert_allclose(before[1:], after[1:], atol=1e-6)
  assert not np.allclose(before[0], after[0])


def test_addim_adds_the_missing_energy():
  # DDIM's noise component carries sigma_s^2 mean(eps_hat^2) energy per
  # dimension; aDDIM adds exactly c^2 x_var, the variance of z_s that the
  # posterior mean leaves out.
  x, z_t = _data((B, 16, 16, 3), 5)
  a_t, s_t, a_s, s_s = _coefs(0.9, 0.8)
  x_var = 0.3
  z_s = ddim.addim_step(x, z_t, a_t, s_t, a_s, s_s, x_var)
  c = a_s - a_t * s_s / s_t
  eps_sq = jnp.mean(((z_t - a_t * x) / s_t)**2, axis=(1, 2, 3))
  noise = z_s - a_s * x
  np.testing.assert_allclose(jnp.mean(noise**2, axis=(1, 2, 3)),
                             s_s**2 * eps_sq + c**2 * x_var, rtol=1e-4)


def test_x_from_v():
  x, eps = _data((B, 3))
  a, s = schedules.alpha_sigma(jnp.array([-2., 0., 1., 3.]))
  e = lambda c: c[:, None]
  z = e(a) * x + e(s) * eps
  v = e(a) * eps - e(s) * x
  np.testing.assert_allclose(ddim.x_from_v(v, z, a, s), x, atol=1e-5)
