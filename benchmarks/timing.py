"""The benchmarks' one timer."""

import time

import jax


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
