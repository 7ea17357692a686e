import jax
import jax.numpy as jnp
import pytest

from configs import digits
from configs import imagenet128
from configs import imagenet64
from configs import toy2d
from multistep_cm import models
from multistep_cm.core import state as state_lib


def _abstract_params(config):
  model = state_lib.create_model(config)
  shape = (2,) + state_lib.data_shape(config)
  return model, jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros(shape), jnp.zeros(2),
                         jnp.zeros(2, jnp.int32)))['params']


# Parameter counts the paper gives for its UViTs (spec section 7).
@pytest.mark.parametrize('module,size,millions', [
    (imagenet64, 'small', 394), (imagenet64, 'large', 1230),
    (imagenet128, 'small', 397), (imagenet128, 'large', 1250)])
def test_paper_sizes(module, size, millions):
  _, params = _abstract_params(module.get_config(size))
  count = models.count_params(params) / 1e6
  assert abs(count - millions) / millions < 0.05, count


@pytest.mark.parametrize('config', [
    digits.get_config('smoke'), toy2d.get_config('smoke'),
    imagenet64.get_config('smoke')])
def test_output_shape_and_dtype(config):
  model, _ = _abstract_params(config)
  shape = (3,) + state_lib.data_shape(config)
  z = jnp.ones(shape)
  labels = jnp.array([0, 1, config.dataset.num_classes])  # Incl. the null label.
  params = model.init(jax.random.key(0), z, jnp.zeros(3), labels)['params']
  fn = models.network_fn(model)
  out = fn(params, z, jnp.array([0.1, 0.5, 1.]), labels)
  assert out.shape == shape and out.dtype == jnp.float32
  # Scalar t broadcasts; dropout needs only an rng to turn on.
  assert fn(params, z, 0.5, labels, jax.random.key(1)).shape == shape


def test_bf16_compute_float32_params():
  config = imagenet64.get_config('smoke')
  config.model.dtype = 'bfloat16'
  _, params = _abstract_params(config)
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype('float32')}


def test_labels_change_the_prediction():
  config = digits.get_config('smoke')
  model = state_lib.create_model(config)
  z = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  params = model.init(jax.random.key(0), z, jnp.zeros(2),
                      jnp.zeros(2, jnp.int32))['params']
  # The output layer starts at zero; perturb it so the output depends on input.
  params = jax.tree.map(lambda p: p + 0.01, params)
  fn = models.network_fn(model)
  a = fn(params, z, 0.5, jnp.array([1, 1]))
  b = fn(params, z, 0.5, jnp.array([2, 10]))
  assert float(jnp.abs(a - b).max()) > 1e-4


def test_unknown_model():
  with pytest.raises(ValueError, match='Unknown model'):
    models.create_model({'name': 'unet'})


def test_config_arguments():
  assert imagenet64.get_config('large').model.mid_channels == 2048
  assert imagenet64.get_config('size=large').model.mid_channels == 2048
  for bad in ('huge', 'size=huge', 'smok'):
    with pytest.raises(ValueError, match='Unknown'):
      imagenet64.get_config(bad)


def test_attention_auto_is_xla_on_the_cpu():
  """`auto` picks XLA here, so the embedded default is unchanged: the same
  outputs, to the bit, as `xla`; cuDNN only on GPUs, for shapes it takes."""
  assert jax.default_backend() == 'cpu'
  outs = {}
  for attention in ('auto', 'xla'):
    config = digits.get_config('smoke')
    config.model.attention = attention
    model = state_lib.create_model(config)
    z = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    t, labels = jnp.full((4,), 0.3), jnp.arange(4)
    params = model.init(jax.random.key(0), z, t, labels)
    outs[attention] = model.apply(params, z, t, labels)
  assert (outs['auto'] == outs['xla']).all()
  pick = models.attention_implementation
  assert pick('auto', jnp.bfloat16, 64) == 'xla'
  assert pick('auto', jnp.bfloat16, 64, backend='gpu') == 'cudnn'
  assert pick('auto', jnp.float32, 64, backend='gpu') == 'xla'
  assert pick('auto', jnp.bfloat16, 256, backend='gpu') == 'xla'
  assert pick('auto', jnp.bfloat16, 64, backend='tpu') == 'xla'
  assert pick('cudnn', jnp.float32, 64) == 'cudnn'
  with pytest.raises(ValueError, match='Unknown attention'):
    pick('flash', jnp.bfloat16, 64)
