"""The benchmarks' one timer, and their one batch of random data."""

import time

import jax

from multistep_cm import conditioning
from multistep_cm.core import sharding


def seconds_per_call(fn, repeats, warmup=1):
  """Mean seconds per call of `fn`, after `warmup` calls (the first compiles);
  waits for the device, not only for dispatch."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  t0 = time.perf_counter()
  for _ in range(repeats):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / repeats


def random_batch(run, batch_size):
  """A train batch of random images with example conditions, on `run`'s
  mesh: a step's cost does not depend on the data, which need not be on
  this machine (ImageNet)."""
  batch = {'x': jax.random.normal(jax.random.key(1),
                                  (batch_size,) + run.shape),
           conditioning.KEY: run.condition.example(batch_size)}
  return sharding.global_batch(jax.device_get(batch), run.mesh)
