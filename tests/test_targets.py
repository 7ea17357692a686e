"""Compiling for accelerators that are not here: TPU slices and GPU nodes by
name, their compilers loaded only when asked, fit verdicts, model FLOPs,
and backend-dependent choices that follow the target."""

import contextlib
import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from configs import digits
from configs import imagenet64
from configs import toy2d
from multistep_cm import describe
from multistep_cm import models
from multistep_cm import networks
from multistep_cm import run as run_lib
from multistep_cm import targets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('name, devices, topology, slices', [
    ('v5p-64', 32, 'v5p:2x4x4', 1),  # v5p counts TensorCores, two a chip.
    ('v5p-8', 4, 'v5p:2x2x1', 1),
    ('v4-32', 16, 'v4:2x2x4', 1),
    ('v5litepod-64', 64, 'v5e:8x8', 1),
    ('v6e-8', 8, 'v6e:2x4', 1),
    ('2xv5p-64', 64, 'v5p:2x4x4', 2),
    ('8xh100', 8, '1x1x8', 1),
    ('16xb200', 16, '1x2x8', 1),
])
def test_targets_by_the_names_users_book_them(name, devices, topology,
                                              slices):
  target = targets.get(name)
  assert (target.devices, target.topology, target.slices) == (
      devices, topology, slices)
  # The TPU compiler knows the topology, and gives one device per chip.
  found = targets.devices(target)
  assert len(found) == devices
  assert {d.platform for d in found} == {target.platform}
  assert targets.chip_of(found[0].device_kind) is target.chip


@pytest.mark.parametrize('name', ['v9-8', 'v5p-12', 'v5p-2', 'h100', '9xh100',
                                  '8xv100', ''])
def test_a_wrong_target_is_one_line(name):
  with pytest.raises(targets.TargetError) as e:
    targets.get(name)
  assert '\n' not in str(e.value) and name in str(e.value)


def embedding_gradient(devices):
  """A program whose shardings fight: the gradient of a lookup into a table
  split over 'fsdp', with the batch over both axes (why conditioning.Embed
  gathers its table first). XLA's partitioner replicates two tensors."""
  mesh = jax.make_mesh((2, 4), ('data', 'fsdp'), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  spec = lambda *p: jax.NamedSharding(mesh, jax.P(*p))

  def loss(table, labels, x):
    return jnp.sum(jnp.take(table, labels, axis=0) * x)
  step = jax.jit(jax.grad(loss), out_shardings=spec(None, 'fsdp'),
                 in_shardings=(spec(None, 'fsdp'), spec(('data', 'fsdp')),
                               spec(('data', 'fsdp'))))
  return step.lower(jax.ShapeDtypeStruct((1001, 64), jnp.float32),
                    jax.ShapeDtypeStruct((16,), jnp.int32),
                    jax.ShapeDtypeStruct((16, 64), jnp.float32))


REMATS = """
import jax
from multistep_cm import describe, targets
from tests import test_targets
for name in ('host', 'v5p-16', '8xh100'):
  devices = (jax.devices() if name == 'host' else
             targets.devices(targets.get(name)))
  _, remats = describe.compile_counting_remats(
      test_targets.embedding_gradient(devices[:8]), quiet=True)
  print(name, remats)
"""


def test_involuntary_rematerializations_are_counted_for_every_target():
  # In a process of its own: XLA reads its log level once, at its first
  # line, and each compiler has its own.
  proc = subprocess.run(
      [sys.executable, '-c', REMATS], cwd=ROOT, capture_output=True,
      text=True, timeout=300, check=False,
      env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='1'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ['host', '2', 'v5p-16', '2', '8xh100', '2']


def _smoke(module, *args, **model):
  config = module.get_config(','.join(('smoke',) + args))
  for key, value in model.items():
    config.model[key] = value
  return config


def test_the_attention_kernel_follows_the_target():
  config = _smoke(imagenet64, 'small', dtype='bfloat16')
  gpu, tpu = targets.get('8xh100'), targets.get('v5p-8')
  # cuDNN's on a GPU (compiled as XLA's, without libcudnn); the TPU's flash
  # attention on a TPU; XLA's on this CPU.
  assert describe.attention_kernels(config, gpu) == ('cudnn', 'xla')
  assert describe.attention_kernels(config, tpu) == ('splash', 'splash')
  assert models.attention_implementation('auto', 'bfloat16', 64) == 'xla'
  for target, kernel, wrong in ((gpu, 'cudnn', 'splash'),
                                (tpu, 'splash', 'cudnn')):
    with targets.compiling_for(target):
      assert models.attention_implementation('auto', 'bfloat16', 64) == kernel
      networks.create_model({'name': 'uvit', **_uvit_fields(kernel)})
      with pytest.raises(ValueError, match=f"'{wrong}' needs "):
        networks.create_model({'name': 'uvit', **_uvit_fields(wrong)})
  assert targets.platform() == 'cpu'
  with pytest.raises(ValueError, match='needs an NVIDIA GPU; this run'):
    networks.create_model({'name': 'uvit', **_uvit_fields('cudnn')})


def _uvit_fields(attention):
  return {'levels': (('res', 16, 1, 0.),), 'mid_channels': 32, 'mid_blocks': 1,
          'emb_dim': 32, 'head_dim': 32, 'attention': attention,
          'out_channels': 1}


def test_model_flops_count_the_scanned_blocks_in_full():
  scanned = _smoke(imagenet64, 'small', scan=True, mid_blocks=3)
  counted = describe.model_flops(scanned)['train step']
  unscanned = _smoke(imagenet64, 'small', scan=False, mid_blocks=3)
  assert counted == describe.model_flops(unscanned)['train step']
  one = describe.model_flops(_smoke(imagenet64, 'small', mid_blocks=1))
  assert counted > 1.02 * one['train step']
  # The scanned program's own count has the loop's body once: one block.
  run = run_lib.resolve(scanned, jax.devices()[:8])
  step_fn, inputs, _ = describe._train_inputs(run)  # pylint: disable=protected-access
  own = describe.lowered_flops(step_fn.lower(*inputs)) / scanned.batch_size
  assert own == pytest.approx(one['train step'], rel=2e-3)


def _small(target, mib):
  """`target` with `mib` MiB usable per device."""
  share = targets.gpu_mem_fraction() if target.platform == 'gpu' else 1
  return dataclasses.replace(target, chip=dataclasses.replace(
      target.chip, memory_bytes=mib * 2 ** 20 / share, usable_bytes=0))


def test_a_smoke_config_compiles_for_a_gpu_node():
  """(For a TPU slice: the command-line test below.)"""
  target = targets.get('8xh100')
  step = describe.compile_train_step(_smoke(digits), target)
  assert step.fits(target) and 0 < step.peak < 2 ** 30
  # Without a GPU its compiler counts no FLOPs: the bound rests on the
  # model's and on the bytes every argument and output takes.
  assert step.flops is None
  bound, limit, mfu = describe.roofline(1e12, step, target.chip)
  assert bound == max(1e12 / target.chip.peak_flops,
                      describe.moved_bytes(step)[0] / target.chip.bandwidth)
  assert limit == 'compute' and mfu == 1


def test_a_dot_xla_finds_no_gpu_tiles_for_compiles_with_cublas():
  """XLA's GPU compiler without a GPU found no Triton tiles for a dot of
  text2image's step; compile_for compiles such a program again with
  cuBLAS's matmuls (an option the GPU compiler must accept) and says so."""
  target = targets.get('8xh100')
  mesh = jax.sharding.Mesh(targets.devices(target)[:1], ('x',))
  replicated = jax.NamedSharding(mesh, jax.P())
  lowered = jax.jit(lambda a: a @ a, in_shardings=replicated,
                    out_shardings=replicated).lower(
                        jax.ShapeDtypeStruct((256, 256), jnp.bfloat16))
  asked = []

  class NoTilesWithTriton:
    def compile(self, compiler_options=None):
      asked.append(compiler_options)
      if not compiler_options:
        raise jax.errors.JaxRuntimeError(
            f'INTERNAL: {describe.NO_TILES} that satisfy hlo: %dot.1')
      return lowered.compile(compiler_options=compiler_options)

  compiled = describe.compile_for(NoTilesWithTriton())
  assert asked == [None, {'xla_gpu_enable_triton_gemm': False}]
  assert compiled.note == describe.NO_TILES_NOTE and compiled.fits(target)
  assert compiled.memory['arguments (state, batch, teacher)'] == 256 * 256 * 2
  assert not describe.compile_for(lowered).note

  class Broken:
    def compile(self, compiler_options=None):
      raise jax.errors.JaxRuntimeError('INTERNAL: something else')

  with pytest.raises(jax.errors.JaxRuntimeError, match='something else'):
    describe.compile_for(Broken())


def test_the_verdict_flips_where_the_batch_outgrows_the_chip():
  """On GPUs of 0.5 MiB, the 2-D MLP's step fits with 1 example per device
  and not with 512."""
  target = _small(targets.get('8xh100'), 0.5)
  config = _smoke(toy2d)
  small = describe.compile_train_step(config, target, 8)
  large = describe.compile_train_step(config, target, 8 * 512)
  assert small.fits(target) and not large.fits(target)
  assert 0 < small.peak < 2 ** 19 < large.peak


@pytest.mark.parametrize('per_image, start, expected, compiles_at_most', [
    (1.0, 4, 96, 8),  # Doubling from 4 to 128, then to a multiple of 8
    (1.0, 256, 96, 5),  # past 8; halving from 256 first.
    (20.0, 16, 5, 5),  # Below 8: to the image.
    (200.0, 4, 0, 3),  # Not one image.
    (1e-4, 4, describe.MAX_PER_DEVICE_BATCH, 13),  # The search's cap.
])
def test_the_fit_search(monkeypatch, per_image, start, expected,
                        compiles_at_most):
  """On a chip of 105 MiB, with a program of 4 MiB plus `per_image` MiB an
  image per device (a model of the compiler: the search is what is
  tested), the largest per-device batch that fits is found, each batch
  compiled once, and few compiled: the search aims where the line through
  the last two peaks meets the chip's memory."""
  target = _small(targets.get('v5p-8'), 105)
  compiles = []

  def compile_train_step(config, target, batch_size):
    compiles.append(batch_size // target.devices)
    mib = 4 + per_image * batch_size / target.devices
    return describe.Compiled(dict(zip(describe.TRAIN_STEP_MEMORY, (
        0, 0, 0, int(mib * 2 ** 20)))), None, None, 0, 0.)
  monkeypatch.setattr(describe, 'compile_train_step', compile_train_step)
  config = _smoke(digits)
  config.batch_size = start * target.devices
  best, compiled, tried = describe.fit(config, target)
  assert best == expected and len(compiles) == len(set(compiles))
  assert len(compiles) <= compiles_at_most, compiles
  if best:
    assert compiled is tried[best] and compiled.fits(target)
  if 0 < best < describe.MAX_PER_DEVICE_BATCH:
    # The next batch on the search's grain does not fit.
    assert not compile_train_step(None, target, (best + (
        8 if best >= 8 else 1)) * target.devices).fits(target)


def test_wrong_starts_are_one_line(monkeypatch, tmp_path):
  config = _smoke(digits)
  monkeypatch.setenv(targets.ENV_DIR, str(tmp_path))
  for target, fit, said in (('v5p-8', False, targets.INSTALL),
                            ('v5q-8', False, "unknown target 'v5q-8'"),
                            (None, True, '--fit searches')):
    with pytest.raises(describe.errors.UserError) as e:
      describe.run(config, 'configs/digits.py', target, fit)
    assert said in str(e.value) and '\n' not in str(e.value)


def test_tpu_flash_attention_matches_xla_attention():
  """The TPU's Pallas kernel (splash), in Pallas's interpret mode on the
  CPU, against XLA's attention: outputs and gradients, alone and with each
  device on its own rows of the batch; a length it cannot tile is XLA's."""
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (8, 256, 2, 64)) for key in keys)

  def loss(implementation):
    return lambda q, k, v: jnp.sum(jnp.sin(models.dot_product_attention(
        q, k, v, implementation)))
  want = jax.value_and_grad(loss('xla'), argnums=(0, 1, 2))(q, k, v)
  mesh = jax.make_mesh((8,), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  rows = jax.NamedSharding(mesh, jax.P('data'))
  for on_rows in (False, True):
    inputs = jax.device_put((q, k, v), rows) if on_rows else (q, k, v)
    with (jax.sharding.use_abstract_mesh(mesh.abstract_mesh) if on_rows
          else contextlib.nullcontext()):
      got = jax.jit(jax.value_and_grad(loss('splash'), argnums=(0, 1, 2)))(
          *inputs)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert jnp.max(jnp.abs(a - b)) < 1e-4 * (1 + jnp.max(jnp.abs(b)))
  short = q[:, :64]
  assert jnp.array_equal(
      models.dot_product_attention(short, short, short, 'splash'),
      jax.nn.dot_product_attention(short, short, short))


@pytest.mark.parametrize('name', ['v4-8', 'v5p-8', 'v5litepod-4', 'v6e-4'])
def test_a_tpu_chip_s_usable_memory_is_its_compiler_s(name):
  """A program of twice the table's usable memory per device is refused by
  libtpu, which names what it has: the table's figure."""
  target = targets.get(name)
  mesh = jax.make_mesh((1,), ('one',), devices=targets.devices(target)[:1],
                       axis_types=(jax.sharding.AxisType.Auto,))
  n = int(target.usable_bytes) // 4  # Two float32 arrays of n: twice it.

  def program(x):
    y = jnp.cumsum(x * jnp.arange(n, dtype=jnp.float32))
    return jnp.sum(y * y[::-1])
  replicated = jax.NamedSharding(mesh, jax.P())
  lowered = jax.jit(program, in_shardings=replicated,
                    out_shardings=replicated).lower(
                        jax.ShapeDtypeStruct((), jnp.float32))
  compiled = describe.compile_for(lowered)
  assert (f'exceeds available HBM ({target.usable_bytes / 2**30:.2f}G)'
          in compiled.refused), compiled.refused
  assert not compiled.fits(target)


def test_a_mesh_whose_axes_split_a_tpu_torus():
  """text2image's FSDP axis of 16 over a v6e-64's 8x8 chips: jax.make_mesh
  splits physical axes only on v5e, the project's mesh on any TPU."""
  devices = targets.devices(targets.get('v6e-64'))
  with pytest.raises(NotImplementedError):
    jax.make_mesh((4, 16), ('data', 'fsdp'), devices=devices)
  mesh = describe.sharding.make_mesh(('data', 'fsdp'), (-1, 16), devices)
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 16}
  assert sorted(d.id for d in mesh.devices.flat) == sorted(
      d.id for d in devices)


def test_a_mesh_over_two_slices():
  """Two v5p-8 slices: 'data' spans them, 'fsdp' stays within each."""
  devices = targets.devices(targets.get('2xv5p-8'))
  mesh = describe.sharding.make_mesh(('data', 'fsdp'), (-1, 2), devices)
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 2}
  slices = [{d.slice_index for d in row} for row in mesh.devices]
  assert slices == [{0}, {0}, {1}, {1}]
  with pytest.raises(ValueError, match='spans the 2 slices'):
    describe.sharding.make_mesh(('data', 'fsdp'), (1, 8), devices)
