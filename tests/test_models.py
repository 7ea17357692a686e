import functools

import jax
import jax.numpy as jnp
import pytest

from configs import digits
from configs import imagenet128
from configs import imagenet64
from configs import toy2d
from multistep_cm import models
from multistep_cm import networks
from multistep_cm import run as run_lib
from multistep_cm.core import sharding
from multistep_cm.core import state as state_lib


def _abstract_params(config):
  run = run_lib.resolve(config)
  model = run.model
  shape = (2,) + run.shape
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
  shape = (3,) + run_lib.resolve(config).shape
  z = jnp.ones(shape)
  labels = jnp.array([0, 1, config.dataset.num_classes])  # Incl. the null label.
  params = jax.jit(model.init)(jax.random.key(0), z, jnp.zeros(3),
                               labels)['params']
  fn = jax.jit(models.network_fn(model))
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
  model = run_lib.resolve(config).model
  z = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  params = jax.jit(model.init)(jax.random.key(0), z, jnp.zeros(2),
                               jnp.zeros(2, jnp.int32))['params']
  # The output layer starts at zero; perturb it so the output depends on input.
  params = jax.tree.map(lambda p: p + 0.01, params)
  fn = jax.jit(models.network_fn(model))
  a = fn(params, z, 0.5, jnp.array([1, 1]))
  b = fn(params, z, 0.5, jnp.array([2, 10]))
  assert float(jnp.abs(a - b).max()) > 1e-4


def test_unknown_model():
  with pytest.raises(ValueError, match='Unknown model'):
    networks.create_model({'name': 'unet'})


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
    model = run_lib.resolve(config).model
    z = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    t, labels = jnp.full((4,), 0.3), jnp.arange(4)
    params = jax.jit(model.init)(jax.random.key(0), z, t, labels)
    outs[attention] = jax.jit(model.apply)(params, z, t, labels)
  assert (outs['auto'] == outs['xla']).all()
  pick = models.attention_implementation
  assert pick('auto', jnp.bfloat16, 64) == 'xla'
  assert pick('auto', jnp.bfloat16, 64, backend='gpu') == 'cudnn'
  assert pick('auto', jnp.float32, 64, backend='gpu') == 'xla'
  assert pick('auto', jnp.bfloat16, 256, backend='gpu') == 'xla'
  assert pick('auto', jnp.bfloat16, 64, backend='tpu') == 'splash'
  assert pick('cudnn', jnp.float32, 64) == 'cudnn'
  with pytest.raises(ValueError, match='Unknown attention'):
    pick('flash', jnp.bfloat16, 64)


def _perturbed(params, scale=0.1):
  """Random weights everywhere: the zero-initialised layers would make every
  layout's output trivially zero."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(5), len(leaves))
  return jax.tree.unflatten(tree, [
      p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def _uvit(scan, remat):
  config = digits.get_config('smoke')
  config.model.levels = (('res', 16, 1, 0.), ('attn', 32, 2, 0.1))
  config.model.mid_blocks, config.model.mid_dropout = 3, 0.1
  config.model.scan, config.model.remat = scan, remat
  return run_lib.resolve(config).model


def _close(a, b, rtol):
  """Every array of `a` within `rtol` of `b`'s, relative to the norm of all
  of `b`: float32 tolerance for re-associated sums."""
  diff = [jnp.linalg.norm(x - y) for x, y in zip(jax.tree.leaves(a),
                                                   jax.tree.leaves(b))]
  return float(jnp.linalg.norm(jnp.stack(diff))) <= rtol * float(
      jnp.linalg.norm(jnp.stack([jnp.linalg.norm(y)
                                 for y in jax.tree.leaves(b)])))


def test_scanned_and_rematerialised_blocks_compute_the_same():
  """The same weights give the same outputs and gradients scanned or not,
  rematerialised or not (float tolerance: a scan fuses differently)."""
  z = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  t, labels = jnp.linspace(0.1, 0.9, 4), jnp.arange(4)
  reference = _uvit(False, 'none')
  weights = _perturbed(jax.jit(reference.init)(jax.random.key(1), z, t,
                                               labels)['params'])

  def out_and_grads(m, p):
    # One program per model: compiling is most of this test's time.
    def loss(p):
      out = m.apply({'params': p}, z, t, labels)
      return jnp.sum(out ** 2), out
    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(p)
    return out, grads
  out, grads = jax.jit(functools.partial(out_and_grads, reference))(weights)
  for scan, remat in [(False, 'full'), (True, 'none'), (True, 'full'),
                      (True, 'dots_saveable')]:
    model = _uvit(scan, remat)
    params = models.relayout(weights, model.config)
    # The layout is the model's own: what it would initialise.
    assert jax.tree.structure(params) == jax.tree.structure(jax.eval_shape(
        lambda m=model: m.init(jax.random.key(1), z, t, labels))['params'])
    assert (models.SCANNED in params) == scan
    out_m, grads_m = jax.jit(functools.partial(out_and_grads, model))(params)
    assert _close(out_m, out, 1e-5)
    assert _close(models.relayout(grads_m, reference.config), grads,
                  1e-5), (scan, remat)


def test_relayout_round_trip_is_exact():
  model = _uvit(True, 'none')
  z = jnp.zeros((1, 8, 8, 1))
  params = _perturbed(jax.jit(model.init)(
      jax.random.key(0), z, jnp.zeros(1), jnp.zeros(1, jnp.int32))['params'])
  stacked = params[models.SCANNED]['block']['Dense_0']['kernel']
  assert stacked.shape[0] == 3
  flat = models.relayout(params, _uvit(False, 'none').config)
  assert models.SCANNED not in flat
  # The middle blocks follow the down path's two transformer blocks.
  assert (flat['TransformerBlock_3']['Dense_0']['kernel'] == stacked[1]).all()
  back = models.relayout(flat, model.config)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), back,
                                   params))


def test_remat_keeps_the_parameter_tree():
  """Remat alone changes no names: checkpoints of either setting load."""
  z, t, labels = jnp.zeros((1, 8, 8, 1)), jnp.zeros(1), jnp.zeros(1, jnp.int32)
  trees = [jax.tree.structure(jax.eval_shape(
      lambda m=m: m.init(jax.random.key(0), z, t, labels)))
           for m in (_uvit(False, 'none'), _uvit(False, 'full'))]
  assert trees[0] == trees[1]


def test_unscanned_checkpoint_loads_into_a_scanned_model(digits_teacher,
                                                         tmp_path):
  """A teacher saved with the old (unscanned) layout serves a scanned student,
  with the same predictions; and the reverse."""
  config, workdir = digits_teacher
  run = run_lib.resolve(config)
  flat, _, step = state_lib.load_params(run, workdir)
  scanned_config = config.copy_and_resolve_references()
  scanned_config.model.scan = True
  scanned_run = run_lib.resolve(scanned_config)
  scanned, _, scanned_step = state_lib.load_params(scanned_run, workdir)
  assert step == scanned_step and models.SCANNED in scanned
  z = jax.random.normal(jax.random.key(2), (3, 8, 8, 1))
  t, labels = jnp.array([0.2, 0.5, 0.8]), jnp.array([1, 2, 10])
  out = run.network(flat, z, t, labels)
  assert _close(scanned_run.network(scanned, z, t, labels), out, 1e-5)
  # A config that fits neither layout still stops with the mismatch.
  wider = config.copy_and_resolve_references()
  wider.model.mid_channels = 64
  wider_run = run_lib.resolve(wider)
  with pytest.raises(Exception, match='does not match config.model'):
    state_lib.load_params(wider_run, workdir)


def test_fsdp_keeps_the_scanned_blocks_to_their_own_rows():
  """Under FSDP ('fsdp' > 1) a device computes the network on its own rows
  of the batch only, the scanned middle blocks included: the gradient's
  temporary memory per device is no more than under data parallelism,
  where without the blocks' batch constraint XLA computes the scan over
  the whole batch on every device."""
  config = imagenet64.get_config('small,smoke')
  config.model.scan, config.model.mid_channels = True, 128  # Sharded weights.
  model, abstract = _abstract_params(config)
  network = models.network_fn(model)
  x = jax.ShapeDtypeStruct((16,) + run_lib.resolve(config).shape, jnp.float32)
  labels = jax.ShapeDtypeStruct((16,), jnp.int32)

  def temporaries(shape):
    config.mesh.shape = shape
    mesh = state_lib.make_mesh(config)

    def loss(params, z, cond):
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return jnp.mean(network(params, z, 0.5, cond) ** 2)
    batch = sharding.batch_sharding(mesh)
    grad = jax.jit(jax.grad(loss), in_shardings=(
        sharding.tree_shardings(abstract, mesh), batch, batch))
    return grad.lower(abstract, x, labels).compile().memory_analysis(
        ).temp_size_in_bytes

  assert temporaries((1, 8)) <= 1.1 * temporaries((8, 1))
