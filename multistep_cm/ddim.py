"""The step primitives of spec section 2: DDIM, its inverse, aDDIM, and the
ancestral (DDPM) step that samples the posterior q(z_s | z_t, x).

Every function maps between two times t > u given alpha/sigma at both. These
may be Python scalars, 0-d arrays or per-example arrays of shape (batch,); a
per-example array is broadcast over the remaining axes of the latents, whatever
their layout. All arithmetic is float32 whatever dtype the network computes in:
inverse DDIM divides by c(t, u), which is O(1/T) small, and would amplify bf16
rounding error (spec A7).
"""

import jax.numpy as jnp


def _f32(*xs):
  return [jnp.asarray(x, jnp.float32) for x in xs]


def expand(coef, like):
  """Broadcasts a scalar or (batch,) coefficient against a (batch, ...) array."""
  if coef.ndim == 0:
    return coef
  return coef.reshape(coef.shape + (1,) * (like.ndim - coef.ndim))


def _coefs(z, alpha_t, sigma_t, alpha_s, sigma_s):
  """r = sigma_s / sigma_t and c = alpha_s - alpha_t r, broadcast against z."""
  alpha_t, sigma_t, alpha_s, sigma_s = (
      expand(a, z) for a in _f32(alpha_t, sigma_t, alpha_s, sigma_s))
  r = sigma_s / sigma_t
  return alpha_t, sigma_t, alpha_s, sigma_s, r, alpha_s - alpha_t * r


def ddim_step(x_pred, z_t, alpha_t, sigma_t, alpha_s, sigma_s):
  """DDIM from t to s: z_s = alpha_s x + sigma_s eps_hat, eps_hat implied by x."""
  x_pred, z_t = _f32(x_pred, z_t)
  _, _, _, _, r, c = _coefs(z_t, alpha_t, sigma_t, alpha_s, sigma_s)
  return c * x_pred + r * z_t


def inverse_ddim(z_s, z_t, alpha_t, sigma_t, alpha_s, sigma_s):
  """The x for which `ddim_step(x, z_t, ...)` lands exactly on z_s."""
  z_s, z_t = _f32(z_s, z_t)
  _, _, _, _, r, c = _coefs(z_t, alpha_t, sigma_t, alpha_s, sigma_s)
  return (z_s - r * z_t) / c


def addim_step(x_pred, z_t, alpha_t, sigma_t, alpha_s, sigma_s, x_var):
  """Adjusted DDIM (paper eq. 14): DDIM whose noise component is inflated by the
  variance that the posterior mean x_pred leaves out.

  `x_var` is the per-dimension variance of x given z_t, a scalar or one value
  per example. The norm of eps_hat is taken per example, never over the batch,
  and the x coefficient is alpha at the target time s (spec A8).
  """
  x_pred, z_t = _f32(x_pred, z_t)
  alpha_t, sigma_t, alpha_s, sigma_s, _, c = _coefs(
      z_t, alpha_t, sigma_t, alpha_s, sigma_s)
  x_var = expand(jnp.asarray(x_var, jnp.float32), z_t)
  eps = (z_t - alpha_t * x_pred) / sigma_t
  axes = tuple(range(1, z_t.ndim))
  # mean(eps^2) per example is ||eps||^2 / d; clamped so a degenerate eps stays finite.
  eps_sq = jnp.maximum(jnp.mean(jnp.square(eps), axis=axes, keepdims=True),
                       1e-12)
  zeta = jnp.square(c) * x_var
  return alpha_s * x_pred + jnp.sqrt(jnp.square(sigma_s) + zeta / eps_sq) * eps


def ddpm_step(x_pred, z_t, alpha_t, sigma_t, alpha_s, sigma_s, noise):
  """Ancestral step from t to s: a draw of the posterior q(z_s | z_t, x) with
  x = x_pred (Kingma et al. 2021), with alpha_ts = alpha_t / alpha_s and
  sigma_ts^2 = sigma_t^2 - alpha_ts^2 sigma_s^2:
    mean = alpha_ts sigma_s^2 / sigma_t^2 z_t + alpha_s sigma_ts^2 / sigma_t^2 x,
    var = sigma_ts^2 sigma_s^2 / sigma_t^2,
  plus sqrt(var) `noise` (standard normal, shaped like z_t)."""
  x_pred, z_t, noise = _f32(x_pred, z_t, noise)
  alpha_t, sigma_t, alpha_s, sigma_s, _, _ = _coefs(
      z_t, alpha_t, sigma_t, alpha_s, sigma_s)
  alpha_ts = alpha_t / alpha_s
  var_ts = jnp.maximum(jnp.square(sigma_t) - jnp.square(alpha_ts * sigma_s),
                       0.)
  inv_var_t = 1. / jnp.square(sigma_t)
  mean = (alpha_ts * jnp.square(sigma_s) * inv_var_t * z_t +
          alpha_s * var_ts * inv_var_t * x_pred)
  return mean + jnp.sqrt(var_ts * jnp.square(sigma_s) * inv_var_t) * noise


def x_from_v(v_pred, z_t, alpha_t, sigma_t):
  """x = alpha z_t - sigma v, for v = alpha eps - sigma x (spec 1.3)."""
  v_pred, z_t = _f32(v_pred, z_t)
  alpha_t, sigma_t = (expand(a, z_t) for a in _f32(alpha_t, sigma_t))
  return alpha_t * z_t - sigma_t * v_pred


def v_from_x(x_pred, z_t, alpha_t, sigma_t):
  """v = (alpha z_t - x) / sigma, the inverse of `x_from_v`."""
  x_pred, z_t = _f32(x_pred, z_t)
  alpha_t, sigma_t = (expand(a, z_t) for a in _f32(alpha_t, sigma_t))
  return (alpha_t * z_t - x_pred) / sigma_t
