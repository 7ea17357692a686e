"""Samples on the mesh: the one recipe that training-time evaluation,
--mode=sample, --mode=evaluate, the pipeline's table and the sweep sample
with.

A `Generator` is one jitted program: noise, a sampler (`SamplerSpec`) over
a batch sharded across all devices, optionally the conversion to uint8 and
a feature network (the FID Inception) run on the devices that hold the
samples, so only features need reach the host.
"""

import jax
import jax.numpy as jnp
import numpy as np

from multistep_cm.core import sharding


def eval_inputs(dataset, n):
  """(labels, cond) of `n` evaluation samples: what sample i is drawn for
  and scored against, and the condition value the network is given for it;
  both from the run's dataset (`datasets.base.Dataset`)."""
  labels = dataset.eval_labels(n)
  return labels, dataset.eval_cond(labels)


# Stochastic samplers draw their per-step noise from keys folded with this,
# apart from the initial noise's.
STEP_NOISE = 1 << 30


def example_keys(seed_start, n):
  """Per-step noise keys of examples start, ..., start + n - 1 (as
  `example_noise`), one per example."""
  key = jax.random.key(seed_start[0])
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, i),
                                               STEP_NOISE))(
                                                   seed_start[1] +
                                                   jnp.arange(n))


def example_noise(seed_start, n, shape):
  """Noise of examples start, ..., start + n - 1 (`seed_start` = (seed,
  start)), row j from its own key: a sample's noise does not depend on the
  batch, the batch size or the mesh it is drawn in."""
  key = jax.random.key(seed_start[0])
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i),
                                              shape))(seed_start[1] +
                                                      jnp.arange(n))


def to_uint8(x):
  """[-1, 1] to uint8 as round((x + 1) * 127.5), the ADM convention (the jnp
  twin of `images.to_uint8`)."""
  return jnp.clip(jnp.round((x + 1.) * 127.5), 0, 255).astype(jnp.uint8)


class Generator:
  """Samples of the run's network (its parameters sharded as
  `param_shardings` on `run.mesh`) with the sampler `spec`.

  Noise is drawn per batch, from fold_in(key(seed), first index of the
  batch), as training-time evaluation and the tables do; or, with
  `per_example_noise`, for sample i from (seed, i) alone, so that samples do
  not depend on the batch size, the mesh, the hosts or an interruption
  (--mode=evaluate). A stochastic sampler's per-step noise follows the same
  rule, from keys apart from the initial noise's (`STEP_NOISE`).
  Outputs: {'samples'}, float, or uint8 for images with `uint8`;
  `features(feature_params, uint8 images) -> dict` adds its outputs.
  """

  def __init__(self, run, param_shardings, spec, *, per_example_noise=False,
               uint8=False, features=None):
    self.mesh = mesh = run.mesh
    self.per_example_noise = per_example_noise
    network, logsnr, condition = run.network, run.logsnr_fn, run.condition
    shape, images = run.shape, run.dataset.images
    batch = sharding.batch_sharding(mesh)

    def fn(params, feature_params, rng, cond):
      n = jax.tree.leaves(cond)[0].shape[0]
      if per_example_noise:
        noise = example_noise(rng, n, shape)
        step_keys = example_keys(rng, n)
      else:
        noise = jax.random.normal(rng, (n,) + shape)
        step_keys = jax.random.fold_in(rng, STEP_NOISE)
      noise = jax.lax.with_sharding_constraint(noise, batch)
      # The mesh in context, for the network's own sharding constraints.
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        x = spec(network, params, noise, cond, logsnr, condition, step_keys)
      if not images or not (uint8 or features):
        return {'samples': x}
      x = to_uint8(x)
      return {'samples': x, **(features(feature_params, x) if features
                               else {})}

    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    self._fn = jax.jit(fn, in_shardings=(param_shardings, replicated,
                                         replicated, batch),
                       out_shardings=batch)

  def lower(self, params, cond):
    """The sampler lowered for abstract `params` and `cond` (one batch, a
    multiple of the mesh's devices), as `batches` calls it: to compile
    ahead of time."""
    if self.per_example_noise:
      rng = jax.ShapeDtypeStruct((2,), np.int32)
    else:
      rng = jax.eval_shape(lambda: jax.random.key(0))
    return self._fn.lower(params, None, rng, cond)

  def batches(self, params, cond, seed, batch_size, start=0,
              feature_params=None):
    """Yields (outputs as batch-sharded arrays, real rows) for `cond`, the
    condition values of samples start, start + 1, ..., in batches of
    `batch_size` rounded up to the mesh, the last one padded."""
    bs = sharding.mesh_batch_size(batch_size, self.mesh)
    for i, batch, rows in sharding.padded_batches(cond, bs, self.mesh):
      if self.per_example_noise:
        rng = np.array([seed, start + i], np.int32)
      else:
        rng = jax.random.fold_in(jax.random.key(seed), i)
      yield self._fn(params, feature_params, rng, batch), rows

  def __call__(self, params, cond, seed, batch_size, start=0,
               feature_params=None):
    """Every output for `cond`, as numpy arrays on every host."""
    out = [{k: sharding.to_host(v, rows) for k, v in o.items()}
           for o, rows in self.batches(params, cond, seed, batch_size, start,
                                       feature_params)]
    return {k: np.concatenate([o[k] for o in out]) for k in out[0]}
