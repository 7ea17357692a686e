"""Algorithm 1: annealing, segments, the two limit claims of spec section 5."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from multistep_cm import conditioning
from multistep_cm import ddim
from multistep_cm import losses
from multistep_cm import models
from multistep_cm import samplers
from multistep_cm import schedules

# A schedule whose sigma_0 is ~1e-9, where the S = 1 reduction is exact to
# float32 precision (with the default clip, sigma_0 = 5.5e-4 leaves a tiny
# DDIM term behind).
SHARP = functools.partial(schedules.cosine_logsnr, logsnr_max=40.)
B = 16


def _mlp(seed=0):
  """A random nonlinear network: an MLP whose zero-initialised head is jittered."""
  model = models.MLP(models.MLPConfig(width=32, num_blocks=2, emb_dim=16,
                                      out_channels=3,
                                      condition=conditioning.ClassLabels(4)))
  params = model.init(jax.random.key(seed), jnp.zeros((1, 3)), jnp.zeros(1),
                      jnp.zeros(1, jnp.int32))['params']
  params = jax.tree.map(
      lambda p: p + 0.1 * jax.random.normal(jax.random.key(seed + 1), p.shape),
      params)
  return models.network_fn(model), params


def _draws(seed=0):
  kx, ke, kl = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kx, (B, 3)), jax.random.randint(kl, (B,), 0, 4),
          jax.random.normal(ke, (B, 3)))


def _x(net, params, z, t, labels, logsnr_fn=SHARP):
  a, s = schedules.alpha_sigma(logsnr_fn(t))
  return ddim.x_from_v(net(params, z, t, labels), z, a, s)


def test_annealing_schedule():
  n = lambda i: float(losses.teacher_step_count(i))
  np.testing.assert_allclose(n(0), 64., rtol=1e-6)
  np.testing.assert_allclose(n(50_000), np.sqrt(64 * 1280), rtol=1e-5)
  np.testing.assert_allclose(n(100_000), 1280., rtol=1e-5)
  np.testing.assert_allclose(n(250_000), 1280., rtol=1e-5)
  assert [int(v) for v in losses.segment_grid(0, 8)] == [8, 64]
  assert [int(v) for v in losses.segment_grid(100_000, 8)] == [160, 1280]
  assert [int(v) for v in losses.segment_grid(50_000, 16)] == [18, 288]
  # Never fewer than one teacher step per segment.
  assert [int(v) for v in losses.segment_grid(0, 256)] == [1, 256]


def test_segment_boundaries():
  S = 4
  t = jnp.array([0.25, 0.5, 0.75, 1., 0.25 + 1 / 64, 1 / 64])
  np.testing.assert_array_equal(losses.segment_of(t, S), [0, 1, 2, 3, 1, 0])
  # Every grid time of every segment: t = k/S belongs to segment k - 1.
  T = 32
  grid = jnp.arange(1, T + 1) / T
  np.testing.assert_array_equal(losses.segment_of(grid, S),
                                np.repeat(np.arange(S), T // S))


def test_sampled_times_lie_on_the_grid_inside_their_segment():
  S, n_seg = 4, jnp.int32(8)
  T = 32
  t, s, t_step = losses.sample_times(jax.random.key(0), 4096, S, n_seg)
  np.testing.assert_allclose(t * T, np.round(t * T), atol=1e-4)
  np.testing.assert_allclose(t - s, 1. / T, atol=1e-6)
  np.testing.assert_allclose(t_step, losses.segment_of(t, S) / S, atol=1e-6)
  assert np.all(t > t_step) and np.all(t <= t_step + 1. / S + 1e-6)
  assert float(t.max()) == 1. and np.isclose(float(t.min()), 1. / T)
  # With one teacher step per segment every pair starts at a boundary.
  _, s, t_step = losses.sample_times(jax.random.key(1), 512, S, jnp.int32(1))
  np.testing.assert_array_equal(s, t_step)


@pytest.mark.parametrize('mode', ['ct', 'cd'])
def test_one_step_is_the_consistency_model_loss(mode):
  """S = 1: w rho(f(z_t, t) - stopgrad f(z_s, s)), the CM objective."""
  net, params = _mlp()
  teacher, teacher_params = _mlp(7)
  x, labels, eps = _draws()
  T = 64
  i = jax.random.randint(jax.random.key(3), (B,), 1, T + 1)
  t, s, t_step = i / T, (i - 1) / T, jnp.zeros(B)
  terms = losses.consistency_loss_terms(
      net, params, params, x, labels, eps, t, s, t_step, SHARP, mode=mode,
      teacher=teacher, teacher_params=teacher_params)

  (a_t, s_t), (a_s, s_s) = (schedules.alpha_sigma(SHARP(u)) for u in (t, s))
  z_t = a_t[:, None] * x + s_t[:, None] * eps
  if mode == 'ct':
    z_s = a_s[:, None] * x + s_s[:, None] * eps
  else:
    x_tea = _x(teacher, teacher_params, z_t, t, labels)
    x_var = 0.75 * jnp.mean((x_tea - x)**2, axis=1)
    z_s = ddim.addim_step(x_tea, z_t, a_t, s_t, a_s, s_s, x_var)
  # At s = 0 the reference is z_s itself, i.e. the data end of the ODE.
  ref = jnp.where((s == 0)[:, None], z_s, _x(net, params, z_s, s, labels))
  cm = (jnp.exp(SHARP(t)) + 1) * losses.pseudo_huber(
      _x(net, params, z_t, t, labels) - ref, 1e-4)
  np.testing.assert_allclose(terms, cm, rtol=2e-3, atol=1e-5)


def test_ct_with_one_teacher_step_per_segment_is_diffusion():
  """S = T: every pair starts at its boundary, so MCT is w rho(f(z_t) - x)."""
  net, params = _mlp()
  x, labels, eps = _draws(1)
  S = 16
  k = jax.random.randint(jax.random.key(4), (B,), 0, S)
  t, s = (k + 1) / S, k / S
  terms = losses.consistency_loss_terms(net, params, params, x, labels, eps, t,
                                        s, s, schedules.cosine_logsnr,
                                        mode='ct')
  a_t, s_t = schedules.alpha_sigma(schedules.cosine_logsnr(t))
  z_t = a_t[:, None] * x + s_t[:, None] * eps
  x_hat = _x(net, params, z_t, t, labels, schedules.cosine_logsnr)
  diffusion = (jnp.exp(schedules.cosine_logsnr(t)) + 1) * losses.pseudo_huber(
      x_hat - x, 1e-4)
  np.testing.assert_allclose(terms, diffusion, rtol=1e-3)


def test_exact_model_of_constant_data_has_zero_loss():
  # For data that is always 0 every DDIM path is consistent, so a student and
  # teacher that know it have zero CD, CT and PD loss.
  def zero(params, z, t, labels, rng=None):
    a, s = schedules.alpha_sigma(schedules.cosine_logsnr(t))
    return (a / s)[:, None] * z
  x, labels = jnp.zeros((B, 3)), jnp.zeros(B, jnp.int32)
  rng = jax.random.key(0)
  for mode in ('cd', 'ct'):
    loss, aux = losses.multistep_consistency_loss(
        zero, None, x, labels, rng, schedules.cosine_logsnr, 4, 0,
        mode=mode, teacher=zero)
    assert float(loss) < 1e-3 and int(aux['n_seg']) == 16
  pd = losses.progressive_distillation_loss(zero, None, zero, None, x, labels,
                                            rng, schedules.cosine_logsnr, 4)
  assert float(pd) < 1e-6


def test_gradient_flows_through_the_student_only():
  net, params = _mlp()
  x, labels, _ = _draws(2)

  def loss(p, target):
    return losses.multistep_consistency_loss(
        net, p, x, labels, jax.random.key(0), schedules.cosine_logsnr, 4,
        10_000, target_params=target, mode='ct')[0]
  g_target = jax.grad(loss, argnums=1)(params, params)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(g_target))
  g = jax.grad(loss)(params, params)
  assert any(float(jnp.abs(v).max()) > 0 for v in jax.tree.leaves(g))


def test_synchronized_dropout():
  """Student and reference get the same dropout rng; the teacher none."""
  seen = []

  def net(tag):
    def fn(params, z, t, labels, rng=None):
      seen.append((tag, None if rng is None else tuple(
          np.asarray(jax.random.key_data(rng)))))
      return jnp.zeros_like(z)
    return fn
  x, labels, _ = _draws()
  losses.multistep_consistency_loss(
      net('student'), None, x, labels, jax.random.key(0),
      schedules.cosine_logsnr, 4, 0, mode='cd', teacher=net('teacher'))
  rngs = {tag: [r for t, r in seen if t == tag] for tag in ('student',
                                                             'teacher')}
  assert len(rngs['student']) == 2 and rngs['student'][0] == rngs['student'][1]
  assert rngs['student'][0] is not None and rngs['teacher'] == [None]


def test_annealing_does_not_recompile():
  net, params = _mlp()
  x, labels, _ = _draws()
  traces = []

  @jax.jit
  def loss(iteration):
    traces.append(1)
    return losses.multistep_consistency_loss(
        net, params, x, labels, jax.random.key(0), schedules.cosine_logsnr, 8,
        iteration, mode='ct')
  its = (0, 40_000, 100_000)
  seg = [int(loss(jnp.int32(i))[1]['n_seg']) for i in its]
  expected = [round(64 * 20**min(i / 100_000, 1) / 8) for i in its]
  assert seg == expected == [8, 27, 160] and len(traces) == 1


def test_huber_norms():
  err = jnp.ones((2, 4)) * jnp.array([[1.], [2.]])
  np.testing.assert_allclose(losses.pseudo_huber(err, 0., 'rms'), [1., 2.])
  np.testing.assert_allclose(losses.pseudo_huber(err, 0., 'sum'), [2., 4.])
  np.testing.assert_allclose(losses.pseudo_huber(err, 1., 'elementwise'),
                             [np.sqrt(2) - 1, np.sqrt(5) - 1], rtol=1e-6)
  with pytest.raises(ValueError, match='Unknown norm'):
    losses.pseudo_huber(err, 0., 'l1')


def test_consistency_sampler_makes_s_network_evaluations():
  calls = []

  def net(params, z, t, labels, rng=None):
    calls.append(1)  # Runs once per evaluation when not traced.
    return jnp.zeros_like(z)
  noise = jnp.ones((2, 3))
  for S in (1, 2, 4, 8, 16):
    calls.clear()
    with jax.disable_jit():
      samplers.consistency_sample(net, None, noise, jnp.zeros(2, int),
                                  schedules.cosine_logsnr, S)
    assert len(calls) == S == samplers.nfe(S)
  assert samplers.nfe(8, guidance=1.,
                      condition=conditioning.ClassLabels(10)) == 16


def test_empirical_x_var():
  # For data x ~ N(0, 1) the exact denoiser is x_hat = alpha z, i.e. v = 0,
  # and E||x_hat - x||^2 / d is the posterior variance, sigma^2.
  def gaussian(params, z, t, labels, rng=None):
    return jnp.zeros_like(z)
  x = jax.random.normal(jax.random.key(0), (20_000, 2))
  v = samplers.estimate_x_var(gaussian, None, x, None, schedules.cosine_logsnr,
                              8, jax.random.key(1), xvar_frac=1.)
  t = 1. - jnp.arange(8) / 8
  _, s = schedules.alpha_sigma(schedules.cosine_logsnr(t))
  np.testing.assert_allclose(v, s**2, rtol=0.05)


def test_guided_teacher_step():
  """Spec A9: the guided prediction drives the aDDIM step; the variance comes
  from the plain conditional prediction."""
  def teacher(params, z, t, labels, rng=None):
    # x_hat = label value (null = 4) everywhere: v = (alpha z - x) / sigma.
    a, s = schedules.alpha_sigma(schedules.cosine_logsnr(t))
    x = jnp.broadcast_to(labels[:, None].astype(jnp.float32), z.shape)
    return (a[:, None] * z - x) / s[:, None]
  z = jax.random.normal(jax.random.key(0), (3, 2))
  t = jnp.full((3,), 0.5)
  labels = jnp.array([0, 1, 2])
  guided, cond = losses.teacher_x(teacher, None, z, t, labels,
                                  schedules.cosine_logsnr, guidance=2.,
                                  condition=conditioning.ClassLabels(4))
  np.testing.assert_allclose(cond[:, 0], [0, 1, 2], atol=1e-5)
  np.testing.assert_allclose(guided[:, 0], 3. * np.array([0, 1, 2]) - 2. * 4,
                             atol=1e-4)
  plain, same = losses.teacher_x(teacher, None, z, t, labels,
                                 schedules.cosine_logsnr)
  np.testing.assert_array_equal(plain, same)
