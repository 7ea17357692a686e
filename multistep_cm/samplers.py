"""Samplers. Each runs its whole loop as one `lax.fori_loop`, so a sampler is
a single compiled program whatever its step count; jit it with the batch
sharded over the mesh to sample on many devices."""

import jax
import jax.numpy as jnp

from multistep_cm import ddim
from multistep_cm import schedules


def guided_network(network, guidance, num_classes):
  """Classifier-free guidance on the prediction: (1 + w) cond - w uncond.

  The prediction is linear in v, x and eps alike, so guiding v guides all of
  them. `w = 0` is the plain conditional network and costs one evaluation.
  """
  if guidance == 0. or not num_classes:
    return network

  def fn(params, z_t, t, labels, rng=None):
    null = jnp.full_like(labels, num_classes)
    v = network(params, jnp.concatenate([z_t, z_t]), t,
                jnp.concatenate([labels, null]), rng)
    cond, uncond = jnp.split(v, 2)
    return (1. + guidance) * cond - guidance * uncond
  return fn


def analytic_x_var(logsnr):
  """v_x(t) = 0.1 / (2 + SNR(t)): 10% of the posterior variance of x under a
  factorised N(0, 0.5) prior (spec 2, the paper's analytic estimate)."""
  return 0.1 / (2. + jnp.exp(logsnr))


def diffusion_sample(network, params, noise, labels, logsnr_fn, num_steps,
                     kind='ddim', guidance=0., num_classes=0):
  """Samples a diffusion model with `num_steps` uniform steps from t = 1 to 0.

  `kind` is 'ddim' or 'addim' (adjusted DDIM with the analytic variance).
  `noise` is z_1 and fixes the batch shape. Returns the final x prediction
  (equivalent to z_0, without its tiny sigma_0 noise term). Network
  evaluations: num_steps, doubled when guided.
  """
  net = guided_network(network, guidance, num_classes)

  def body(i, carry):
    z, _ = carry
    t = 1. - i / num_steps
    s = t - 1. / num_steps
    lt, ls = logsnr_fn(t), logsnr_fn(s)
    (a_t, s_t), (a_s, s_s) = schedules.alpha_sigma(lt), schedules.alpha_sigma(ls)
    x = ddim.x_from_v(net(params, z, t, labels), z, a_t, s_t)
    if kind == 'addim':
      z = ddim.addim_step(x, z, a_t, s_t, a_s, s_s, analytic_x_var(lt))
    else:
      z = ddim.ddim_step(x, z, a_t, s_t, a_s, s_s)
    return z, x

  noise = noise.astype(jnp.float32)
  _, x = jax.lax.fori_loop(0, num_steps, body, (noise, jnp.zeros_like(noise)))
  return x
