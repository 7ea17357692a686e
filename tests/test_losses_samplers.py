import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def test_label_dropout():
  labels = jnp.arange(1000) % 10
  rng = jax.random.key(0)
  np.testing.assert_array_equal(guidance.drop_labels(rng, labels, 0., 10), labels)
  assert np.all(guidance.drop_labels(rng, labels, 1., 10) == 10)
  dropped = np.mean(np.asarray(guidance.drop_labels(rng, labels, 0.1, 10)) == 10)
  assert 0.07 < dropped < 0.13


def test_guidance():
  def net(params, z, t, labels, rng=None):
    return jnp.broadcast_to(labels[:, None].astype(jnp.float32), z.shape)
  z, labels = jnp.zeros((2, 3)), jnp.array([2, 4])
  assert guidance.guided_network(net, 0., 10) is net
  guided = guidance.guided_network(net, 1.5, 10)(None, z, 0.5, labels)
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


@pytest.mark.parametrize('kind', ['ddim', 'addim'])
def test_sampler_recovers_a_gaussian(kind):
  # The probability-flow ODE maps N(0, 1) onto N(0, std^2); 128 steps of DDIM
  # (or aDDIM, which tends to DDIM as steps shrink) get close.
  std = 0.5
  noise = jax.random.normal(jax.random.key(0), (4000, 4))
  x = samplers.diffusion_sample(_gaussian_network(std), None, noise,
                                jnp.zeros(4000, int), LOGSNR, 128, kind)
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
