"""Evaluation cost: the throughput of the FID Inception and of FD-DINOv2's
ViT-L/14 on this machine, and their FLOPs per image against the sampler's,
for a config's network.

  python benchmarks/evaluation.py --config=configs/imagenet64.py

Needs no weights (random ones time the same). FLOPs come from XLA's cost
analysis of the lowered programs, so the large ImageNet networks are counted
without being run; throughput is measured on each feature network alone.
"""

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from multistep_cm import models
from multistep_cm import run as run_lib
from multistep_cm import samplers
from multistep_cm.evaluation import dinov2
from multistep_cm.evaluation import inception
import timing

config_flags.DEFINE_config_file('config', 'configs/imagenet64.py',
                                'Config file.')
flags.DEFINE_integer('batch', 32, 'Images per feature-network call.')
flags.DEFINE_integer('repeats', 3, 'Timed calls.')
FLAGS = flags.FLAGS


def _flops(fn, *args):
  return jax.jit(fn).lower(*args).cost_analysis()['flops']


def main(argv):
  del argv
  config = FLAGS.config
  size = config.dataset.image_size
  images = np.random.default_rng(0).integers(
      0, 256, (FLAGS.batch, size, size, 3), np.uint8)
  params = jax.jit(inception.InceptionV3().init)(
      jax.random.key(0), jnp.zeros((1, 299, 299, 3)))['params']
  fn = jax.jit(lambda p, x: inception.features_fn(p)(x))
  rate = FLAGS.batch / timing.seconds_per_call(lambda: fn(params, images),
                                               FLAGS.repeats)
  inc = _flops(lambda p, x: inception.features_fn(p)(x), params,
               jax.ShapeDtypeStruct((1, size, size, 3), jnp.uint8))
  vit = dinov2.DINOv2Config()  # ViT-L/14, 224x224.
  vit_params = jax.jit(dinov2.DINOv2(vit).init)(
      jax.random.key(0), jnp.zeros((1, 224, 224, 3)))['params']
  vit_fn = jax.jit(lambda p, x: dinov2.features_fn(p, vit)(x))
  vit_rate = FLAGS.batch / timing.seconds_per_call(
      lambda: vit_fn(vit_params, images), FLAGS.repeats)
  dino = _flops(lambda p, x: dinov2.features_fn(p, vit)(x), vit_params,
                jax.ShapeDtypeStruct((1, size, size, 3), jnp.uint8))

  # XLA counts a scanned loop's body once: the blocks unrolled, to count all.
  config = config.copy_and_resolve_references()
  if 'scan' in config.model:
    config.model.scan = False
  run = run_lib.resolve(config)
  model, net = run.model, run.network
  shape = (1,) + run.shape
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape),
                            jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
  one = _flops(lambda p, z: net(p['params'], z, jnp.full((1,), .5),
                                jnp.zeros((1,), jnp.int32)),
               abstract, jax.ShapeDtypeStruct(shape, jnp.float32))
  print(f'{jax.devices()[0].device_kind}: Inception {rate:.1f} images/s at '
        f'batch {FLAGS.batch} ({size}x{size} inputs resized to 299)')
  print(f'{jax.devices()[0].device_kind}: DINOv2 ViT-L/14 {vit_rate:.2f} '
        f'images/s at batch {FLAGS.batch} (resized to 224)')
  print(f'DINOv2 ViT-L/14 {dino / 1e9:.2f} GFLOP/image')
  print(f'Inception {inc / 1e9:.2f} GFLOP/image; network '
        f'({models.count_params(abstract["params"]) / 1e6:.0f}M parameters) '
        f'{one / 1e9:.2f} GFLOP per evaluation')
  for steps in (1, 2, 4, 8):
    nfe = samplers.nfe(steps)  # A student: one evaluation per step.
    print(f'  S={steps}: sampling {nfe * one / 1e9:.1f} GFLOP/sample, '
          f'Inception adds {100 * inc / (nfe * one):.0f}%, DINOv2 '
          f'{100 * dino / (nfe * one):.0f}%')


if __name__ == '__main__':
  app.run(main)
