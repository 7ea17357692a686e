"""Multistep consistency distillation of an exact teacher on toy2d."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from multistep_cm import losses
from multistep_cm import models
from multistep_cm import samplers
from multistep_cm import schedules
from multistep_cm import toy2d
from multistep_cm.evaluation import metrics

LOGSNR = schedules.cosine_logsnr
TEACHER = toy2d.exact_network(LOGSNR)


def test_exact_teacher_is_the_posterior_mean():
  # Monte Carlo check of E[x | z_t] for one z_t: average x over mixture
  # samples weighted by p(z_t | x).
  rng = np.random.default_rng(0)
  x, _ = toy2d.sample(rng, 400_000)
  t = 0.6
  alpha, sigma = (float(v) for v in schedules.alpha_sigma(LOGSNR(t)))
  z = np.array([[0.7, 0.9]], np.float32)
  w = np.exp(-0.5 * np.sum((z - alpha * x)**2, axis=1) / sigma**2)
  mc = (w[:, None] * x).sum(0) / w.sum()
  v = TEACHER(None, jnp.asarray(z), jnp.full((1,), t))
  x_hat = alpha * z - sigma * np.asarray(v)
  np.testing.assert_allclose(x_hat[0], mc, atol=0.02)


def _distil(steps, train_steps=1500, batch=256, seed=0):
  """Trains an MLP student from scratch with CD on the exact teacher."""
  model = models.MLP(models.MLPConfig(width=128, num_blocks=3, emb_dim=64))
  net = models.network_fn(model)
  params = model.init(jax.random.key(seed), jnp.zeros((1, 2)), jnp.zeros(1),
                      jnp.zeros(1, jnp.int32))['params']
  tx = optax.adam(optax.linear_schedule(2e-3, 2e-4, train_steps))
  labels = jnp.zeros(batch, jnp.int32)

  def step(i, carry):
    params, opt = carry
    key = jax.random.fold_in(jax.random.key(seed), i)
    k_x, k_loss = jax.random.split(key)
    comp = jax.random.randint(k_x, (batch,), 0, toy2d.NUM_CLASSES)
    x = jnp.asarray(toy2d.means())[comp] + toy2d.STD * jax.random.normal(
        jax.random.fold_in(k_x, 1), (batch, 2))
    grads = jax.grad(
        lambda p: losses.multistep_consistency_loss(
            net, p, x, labels, k_loss, LOGSNR, steps, i,
            anneal_steps=train_steps // 2, mode='cd', teacher=TEACHER,
            huber_delta=1e-3)[0])(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt

  # One program for the whole run, optimised (the suite turns XLA's
  # optimisations off for its many small programs; this one computes).
  suite_setting = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', False)
  try:
    params, _ = jax.jit(lambda p: jax.lax.fori_loop(
        0, train_steps, step, (p, tx.init(p))))(params)
  finally:
    jax.config.update('jax_disable_most_optimizations', suite_setting)
  return net, params


def test_students_approach_the_data_as_steps_grow():
  noise = jax.random.normal(jax.random.key(42), (2000, 2))
  labels = jnp.zeros(2000, jnp.int32)
  ode = samplers.diffusion_sample(TEACHER, None, noise, labels, LOGSNR, 512)
  swd, gap = {}, {}
  # S = 4 lies between 2 and 8 here too (within the noise of one seed):
  # the ends and the step after one show the trend for a minute less.
  for s in (1, 2, 8):
    net, params = _distil(s)
    x = samplers.consistency_sample(net, params, noise, labels, LOGSNR, s)
    swd[s] = metrics.toy2d_metrics(np.asarray(x))['swd']
    gap[s] = float(jnp.sqrt(jnp.mean(jnp.sum((x - ode)**2, axis=1))))
  exact_swd = metrics.toy2d_metrics(np.asarray(ode))['swd']
  print('swd', swd, 'rms distance to the ODE', gap, 'exact ODE swd', exact_swd)
  assert swd[1] > swd[2] > swd[8]
  assert gap[1] > gap[2] > gap[8]
  # The 8-step student lands next to the exact ODE's own samples: within one
  # mixture component's standard deviation of where the ODE takes the same
  # noise, and as close to the data as the ODE.
  assert gap[8] < toy2d.STD
  assert swd[8] < exact_swd + 0.05
