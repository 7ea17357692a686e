import jax
import jax.numpy as jnp
import numpy as np
import pytest

from multistep_cm import conditioning
from multistep_cm import ddim
from multistep_cm import guidance
from multistep_cm import losses
from multistep_cm import samplers
from multistep_cm import schedules

LOGSNR = schedules.cosine_logsnr


def _zero_data_network(offset=0.):
  """The exact v-prediction when the data is always 0 (z = sigma eps, so
  v = alpha eps = alpha z / sigma), plus a chosen error `offset`."""
  def net(params, z, t, labels, rng=None):
    alpha, sigma = schedules.alpha_sigma(LOGSNR(t))
    return alpha[:, None, None, None] * z / sigma[:, None, None, None] + offset
  return net


def test_exact_network_has_zero_loss():
  x = jnp.zeros((8, 4, 4, 1))
  loss = losses.diffusion_loss(_zero_data_network(), None, x, jnp.zeros(8, int),
                               jax.random.key(0), LOGSNR)
  assert float(loss) < 1e-8


def test_multiscale_loss():
  # A checkerboard error vanishes under 2x2 average pooling, so the
  # multiscale loss is half the plain one; a blockwise constant error is kept.
  checker = (jnp.indices((4, 4)).sum(0) % 2 * 2. - 1.)[None, :, :, None]
  blocks = jnp.kron(jnp.array([[1., -1.], [-1., 1.]]), jnp.ones((2, 2)))[
      None, :, :, None]
  x, labels, rng = jnp.zeros((8, 4, 4, 1)), jnp.zeros(8, int), jax.random.key(0)
  for err, factor in ((checker, 0.5), (blocks, 1.)):
    net = _zero_data_network(err)
    plain = losses.diffusion_loss(net, None, x, labels, rng, LOGSNR)
    multi = losses.diffusion_loss(net, None, x, labels, rng, LOGSNR,
                                  multiscale=True)
    np.testing.assert_allclose(plain, 1., rtol=1e-5)
    np.testing.assert_allclose(multi, factor, rtol=1e-5)


TEN = conditioning.ClassLabels(10)


def test_label_dropout():
  labels = jnp.arange(1000) % 10
  rng = jax.random.key(0)
  np.testing.assert_array_equal(TEN.drop(rng, labels, 0.), labels)
  assert np.all(TEN.drop(rng, labels, 1.) == 10)
  dropped = np.mean(np.asarray(TEN.drop(rng, labels, 0.1)) == 10)
  assert 0.07 < dropped < 0.13


def test_guidance():
  def net(params, z, t, labels, rng=None):
    return jnp.broadcast_to(labels[:, None].astype(jnp.float32), z.shape)
  z, labels = jnp.zeros((2, 3)), jnp.array([2, 4])
  assert guidance.guided_network(net, 0., TEN) is net
  guided = guidance.guided_network(net, 1.5, TEN)(None, z, 0.5, labels)
  # (1 + w) cond - w uncond with the null label 10.
  np.testing.assert_allclose(guided[:, 0], 2.5 * np.array([2, 4]) - 1.5 * 10)


def _gaussian_network(std):
  """Exact v-prediction for data x ~ N(0, std^2 I)."""
  def net(params, z, t, labels, rng=None):
    alpha, sigma = schedules.alpha_sigma(LOGSNR(t))
    alpha, sigma = (jnp.reshape(a, jnp.shape(a) + (1,) * (z.ndim - jnp.ndim(a)))
                    for a in (alpha, sigma))
    x = alpha * std**2 * z / (alpha**2 * std**2 + sigma**2)
    return (alpha * z - x) / sigma
  return net


@pytest.mark.parametrize('kind', ['ddim', 'addim', 'ddpm'])
def test_sampler_recovers_a_gaussian(kind):
  # The probability-flow ODE maps N(0, 1) onto N(0, std^2); 128 steps of DDIM
  # (or aDDIM, which tends to DDIM as steps shrink) get close.
  std = 0.5
  noise = jax.random.normal(jax.random.key(0), (4000, 4))
  x = samplers.diffusion_sample(_gaussian_network(std), None, noise,
                                jnp.zeros(4000, int), LOGSNR, 128, kind,
                                rng=jax.random.key(3))
  np.testing.assert_allclose(jnp.std(x), std, rtol=0.03)


def test_addim_is_less_blurry_in_few_steps():
  # With 4 steps DDIM's samples shrink towards the mean (too little
  # variance); aDDIM puts energy back, so its spread is larger.
  std = 0.5
  noise = jax.random.normal(jax.random.key(1), (4000, 16))
  args = (_gaussian_network(std), None, noise, jnp.zeros(4000, int), LOGSNR, 4)
  assert float(jnp.std(samplers.diffusion_sample(*args, 'addim'))) > float(
      jnp.std(samplers.diffusion_sample(*args, 'ddim')))


def test_x_from_v_round_trip_through_the_network():
  net = _gaussian_network(1.)
  z = jax.random.normal(jax.random.key(2), (4, 3))
  t = jnp.full((4,), 0.4)
  alpha, sigma = schedules.alpha_sigma(LOGSNR(t))
  x = ddim.x_from_v(net(None, z, t, None), z, alpha, sigma)
  # For unit-variance data, E[x | z] = alpha z.
  np.testing.assert_allclose(x, alpha[:, None] * z, rtol=1e-5)


def test_ddpm_step_is_the_posterior_in_float64():
  rng = np.random.default_rng(0)
  x, z, noise = (rng.normal(size=(5, 3)) for _ in range(3))
  t, s = np.array([0.9, 0.7, 0.5, 0.3, 0.1]), np.array([0.8, 0.5, 0.2, 0.1,
                                                         0.])
  (a_t, s_t), (a_s, s_s) = (
      (np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam))))
      for lam in (np.asarray(LOGSNR(u), np.float64) for u in (t, s)))
  a_ts = a_t / a_s
  var_ts = s_t**2 - a_ts**2 * s_s**2
  mean = (a_ts * s_s**2 / s_t**2)[:, None] * z + (
      a_s * var_ts / s_t**2)[:, None] * x
  want = mean + np.sqrt(var_ts * s_s**2 / s_t**2)[:, None] * noise
  got = ddim.ddpm_step(x, z, a_t, s_t, a_s, s_s, noise)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_ddpm_noise_per_example_does_not_depend_on_the_batch():
  net = _gaussian_network(0.5)
  noise = jax.random.normal(jax.random.key(0), (6, 4))
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(9), i))(
      jnp.arange(6))
  whole = samplers.diffusion_sample(net, None, noise, None, LOGSNR, 8, 'ddpm',
                                    rng=keys)
  tail = samplers.diffusion_sample(net, None, noise[2:], None, LOGSNR, 8,
                                   'ddpm', rng=keys[2:])
  np.testing.assert_allclose(whole[2:], tail, rtol=1e-6)
  # It is stochastic: other keys, other samples from the same z_1.
  other = samplers.diffusion_sample(net, None, noise, None, LOGSNR, 8, 'ddpm',
                                    rng=jax.random.key(1))
  assert not np.allclose(other, whole)
  with pytest.raises(ValueError, match='pass rng'):
    samplers.diffusion_sample(net, None, noise, None, LOGSNR, 8, 'ddpm')
  assert samplers.SamplerSpec('ddpm', 8, 1.).nfe(
      conditioning.ClassLabels(3)) == 16


@pytest.mark.parametrize('levels', [2, 3])
def test_multiscale_levels_average_every_pooled_error(levels):
  """`multiscale=k` averages the per-pixel squared v error at full size and
  after 1..k successive 2x2 average pools; 1 is the ImageNet-128 setting
  (0.5 (full + pooled), bit for bit)."""
  err = jax.random.normal(jax.random.key(5), (1, 8, 8, 1))
  x, labels, rng = jnp.zeros((8, 8, 8, 1)), jnp.zeros(8, int), jax.random.key(0)
  net = _zero_data_network(err)
  got = losses.diffusion_loss(net, None, x, labels, rng, LOGSNR,
                              multiscale=levels)
  e, terms = np.asarray(err, np.float64), []
  for level in range(levels + 1):
    if level:
      b, h, w, c = e.shape
      e = e.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    terms.append(np.mean(e**2))
  np.testing.assert_allclose(got, np.mean(terms), rtol=1e-4)
  one = losses.diffusion_loss(net, None, x, labels, rng, LOGSNR, multiscale=1)
  plain = losses.diffusion_loss(net, None, x, labels, rng, LOGSNR)
  pooled = np.mean(np.asarray(err).reshape(1, 4, 2, 4, 2, 1).mean(
      axis=(2, 4))**2)
  np.testing.assert_allclose(one, 0.5 * (plain + pooled), rtol=1e-5)
  assert losses.diffusion_loss(net, None, x, labels, rng, LOGSNR,
                               multiscale=True) == one


def test_huber_delta_zero_is_the_plain_norm_with_finite_gradient():
  err = jnp.concatenate([jnp.zeros((1, 4)), jnp.full((1, 4), 3.)])
  value = losses.pseudo_huber(err, 0.)
  np.testing.assert_allclose(value, [0., 3.], rtol=1e-6)  # rms of (3, 3, 3, 3)
  grad = jax.grad(lambda e: losses.pseudo_huber(e, 0.).sum())(err)
  assert np.isfinite(np.asarray(grad)).all()
  np.testing.assert_allclose(grad[0], 0.)
  np.testing.assert_allclose(grad[1], 0.25, rtol=1e-6)  # d/de sqrt(mean e^2)
  for norm in ('sum', 'elementwise'):
    assert np.isfinite(np.asarray(jax.grad(
        lambda e, n=norm: losses.pseudo_huber(e, 0., n).sum())(err))).all()
  with pytest.raises(ValueError, match='huber_delta must be >= 0'):
    losses.ConsistencyOptions(huber_delta=-1e-4)
  with pytest.raises(ValueError, match='huber_delta must be >= 0'):
    losses.pseudo_huber(err, -1.)



CAPTIONS = conditioning.Captions(4, 6)


def _captions(n, length=4):
  return CAPTIONS.make(jnp.ones((n, length, 6)), jnp.ones((n, length), bool))


def test_guidance_without_a_condition_is_an_error_not_an_unguided_target():
  """The issue's case: captions and w = 3 but no condition= once gave the
  unguided target (the teacher ran on B rows, not 2B) without a word."""
  rows = []

  def net(params, z, t, cond, rng=None):
    rows.append(z.shape[0])
    return jnp.zeros_like(z)
  x, rng = jnp.zeros((4, 2, 2, 1)), jax.random.key(0)
  with pytest.raises(ValueError, match=r'^guidance=3\.0 needs a condition '
                     r'with a null, not UNCONDITIONAL: pass condition=[^\n]*$'):
    losses.guidance_distillation_loss(net, None, net, None, x, _captions(4),
                                      rng, LOGSNR, 3.)
  losses.guidance_distillation_loss(net, None, net, None, x, _captions(4), rng,
                                    LOGSNR, 3., CAPTIONS)
  assert rows == [8, 4]  # The guided teacher's batch, then the student's.


def _ignores_cond(params, z, t, cond, rng=None):
  return jnp.zeros_like(z)


_X = jnp.zeros((4, 2, 2, 1))
_Z = jnp.zeros((4, 3))
_KEY = jax.random.key(0)


@pytest.mark.parametrize('call, match', [
    (lambda: losses.ConsistencyOptions(guidance=3., label_dropout=0.5),
     'guidance=3.0 needs a condition with a null'),
    (lambda: losses.ConsistencyOptions(label_dropout=0.5),
     'label_dropout=0.5 needs a condition with a null'),
    (lambda: losses.diffusion_loss(_ignores_cond, None, _X, jnp.arange(4),
                                   _KEY, LOGSNR, label_dropout=0.1),
     'label_dropout=0.1 needs a condition with a null'),
    (lambda: guidance.guided_v(_ignores_cond, None, _Z, 0.5, jnp.arange(4),
                               2.),
     'guidance=2.0 needs a condition with a null'),
    (lambda: losses.progressive_distillation_loss(
        _ignores_cond, None, _ignores_cond, None, _X, jnp.arange(4), _KEY,
        LOGSNR, 2, guidance=1.),
     'guidance=1.0 needs a condition with a null'),
    (lambda: losses.consistency_loss_terms(
        _ignores_cond, None, None, _X, jnp.arange(4), _X, jnp.ones(4),
        jnp.ones(4) / 2, jnp.zeros(4), LOGSNR, mode='ct', guidance=1.),
     'guidance=1.0 needs a condition with a null'),
    # Captions silently ignored by an unconditional loss.
    (lambda: losses.diffusion_loss(_ignores_cond, None, _X, _captions(4),
                                   _KEY, LOGSNR),
     r"cond is a dict of 'text': float32 \(4, 4, 6\), 'text_mask': bool "
     r'\(4, 4\), which condition=UNCONDITIONAL ignores'),
    # Labels given to a caption condition, and captions to a class one.
    (lambda: losses.multistep_consistency_loss(
        _ignores_cond, None, _X, jnp.arange(4), _KEY, LOGSNR, 2, 0,
        mode='ct', condition=CAPTIONS, label_dropout=0.1),
     r'cond is int32 \(4,\), but condition=Captions\(length=4, width=6, '
     r"pooled_width=0\) takes a dict of 'text': \(4, 4, 6\)"),
    (lambda: losses.diffusion_loss(_ignores_cond, None, _X, _captions(4),
                                   _KEY, LOGSNR, 0.1, TEN),
     r"cond is a dict of .*, but condition=ClassLabels\(num_classes=10\) "
     r'takes integer labels of shape \(4,\)'),
    (lambda: guidance.guided_v(_ignores_cond, None, _Z, 0.5, jnp.ones(4), 2.,
                               TEN),
     r'cond is float32 \(4,\), but condition=ClassLabels'),
    # A caption longer than the configured length.
    (lambda: losses.guidance_distillation_loss(
        _ignores_cond, None, _ignores_cond, None, _X, _captions(4, length=8),
        _KEY, LOGSNR, 3., CAPTIONS),
     r"cond is a dict of 'text': float32 \(4, 8, 6\).* pad or cut captions "
     'to length 4'),
], ids=['options-guidance', 'options-dropout', 'diffusion-dropout',
        'guided_v', 'pd-guidance', 'ct-guidance', 'captions-unconditional',
        'labels-captions', 'captions-classes', 'float-labels',
        'caption-length'])
def test_inconsistent_conditions_are_one_line_errors(call, match):
  with pytest.raises(ValueError, match=match) as error:
    call()
  assert '\n' not in str(error.value)
