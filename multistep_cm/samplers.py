"""Samplers. Each runs its whole loop as one `lax.fori_loop`, so a sampler is
a single compiled program whatever its step count; jit it with the batch
sharded over the mesh to sample on many devices."""

import jax
import jax.numpy as jnp

from multistep_cm import ddim
from multistep_cm import losses
from multistep_cm import schedules


def guided_network(network, guidance, num_classes):
  """The network under classifier-free guidance, (1 + w) cond - w uncond
  (`losses.guided_v`). `w = 0` is the plain network: one evaluation."""
  if guidance == 0. or not num_classes:
    return network

  def fn(params, z_t, t, labels, rng=None):
    return losses.guided_v(network, params, z_t, t, labels, guidance,
                           num_classes, rng)[0]
  return fn


def analytic_x_var(logsnr):
  """v_x(t) = 0.1 / (2 + SNR(t)): 10% of the posterior variance of x under a
  factorised N(0, 0.5) prior (spec 2, the paper's analytic estimate)."""
  return 0.1 / (2. + jnp.exp(logsnr))


def estimate_x_var(network, params, x, labels, logsnr_fn, num_steps, rng,
                   xvar_frac=0.75):
  """Empirical aDDIM variances on data (Alg. 3): for every sampling time
  t_k = k / num_steps, xvar_frac * E||x_hat(z_t) - x||^2 / d over the batch.

  Returns (num_steps,) float32, indexed like the sampler's steps (i = 0 is
  t = 1).
  """
  x = jnp.asarray(x, jnp.float32)

  def one(i):
    t = 1. - i / num_steps
    a, s = schedules.alpha_sigma(logsnr_fn(t))
    eps = jax.random.normal(jax.random.fold_in(rng, i), x.shape)
    z = a * x + s * eps
    x_hat = ddim.x_from_v(network(params, z, t, labels), z, a, s)
    return xvar_frac * jnp.mean(jnp.square(x_hat - x))

  return jax.lax.map(one, jnp.arange(num_steps))


def diffusion_sample(network, params, noise, labels, logsnr_fn, num_steps,
                     kind='ddim', guidance=0., num_classes=0, x_var=None):
  """Samples a diffusion model with `num_steps` uniform steps from t = 1 to 0.

  `kind` is 'ddim' or 'addim' (adjusted DDIM; its variance is the analytic
  0.1 / (2 + SNR) unless `x_var`, one value per step as made by
  `estimate_x_var`, is given). `noise` is z_1 and fixes the batch shape.
  Returns the final x prediction (z_0 without its tiny sigma_0 noise term).
  Network evaluations: `nfe(num_steps, guidance, num_classes)`.
  """
  if kind not in ('ddim', 'addim'):
    raise ValueError(f'Unknown sampler {kind!r}: expected ddim or addim.')
  net = guided_network(network, guidance, num_classes)

  def body(i, carry):
    z, _ = carry
    t = 1. - i / num_steps
    s = t - 1. / num_steps
    lt, ls = logsnr_fn(t), logsnr_fn(s)
    (a_t, s_t), (a_s, s_s) = schedules.alpha_sigma(lt), schedules.alpha_sigma(ls)
    x = ddim.x_from_v(net(params, z, t, labels), z, a_t, s_t)
    if kind == 'addim':
      v = analytic_x_var(lt) if x_var is None else x_var[i]
      z = ddim.addim_step(x, z, a_t, s_t, a_s, s_s, v)
    else:
      z = ddim.ddim_step(x, z, a_t, s_t, a_s, s_s)
    return z, x

  noise = noise.astype(jnp.float32)
  _, x = jax.lax.fori_loop(0, num_steps, body, (noise, jnp.zeros_like(noise)))
  return x


def consistency_sample(network, params, noise, labels, logsnr_fn,
                       student_steps, guidance=0., num_classes=0):
  """The multistep consistency sampler (Alg. 2): S deterministic DDIM steps
  t = k/S -> (k-1)/S on the student's x prediction, no noise injected.
  Returns the last x prediction. Network evaluations: S (2S when guided)."""
  return diffusion_sample(network, params, noise, labels, logsnr_fn,
                          student_steps, 'ddim', guidance, num_classes)


def nfe(num_steps, guidance=0., num_classes=0):
  """Network evaluations of a sampler run: one per step, two when guided."""
  return num_steps * (2 if guidance and num_classes else 1)
