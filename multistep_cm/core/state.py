"""What a run holds: the optimizer, the device mesh, and the train state,
laid out as shapes, then shardings, then arrays; restoring it, or only its
parameters (laid out by an abstract initialisation of the network alone)."""

import dataclasses
import functools
from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
import optax

from multistep_cm import errors
from multistep_cm import weights
from multistep_cm.core import checkpoint
from multistep_cm.core import sharding


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly: one pytree, one checkpoint."""
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


def learning_rate_fn(optim):
  """Linear warmup, then constant: fine for the paper's fine-tuning (spec A5),
  and it makes a run's schedule independent of its length."""
  return optax.linear_schedule(0., optim.lr, max(1, optim.warmup_steps))


def make_optimizer(optim):
  return optax.chain(
      optax.clip_by_global_norm(optim.grad_clip),
      optax.adamw(learning_rate_fn(optim), b1=optim.b1, b2=optim.b2,
                  eps=optim.eps, weight_decay=optim.weight_decay))


def make_mesh(config, devices=None):
  try:
    return sharding.make_mesh(config.mesh.axes, config.mesh.shape, devices)
  except ValueError as e:
    raise errors.ConfigError(f'config.mesh: {e}') from None


def _init_params(run, rng):
  """The network's parameters as a fresh run initialises them (an any-S
  student's with its boundary embedding)."""
  extra = {'boundary': jnp.zeros((1,))} if run.boundary else {}
  return run.model.init(rng, jnp.zeros((1,) + run.shape), jnp.zeros((1,)),
                        run.condition.example(1), **extra)['params']


def _fresh_state(params, tx):
  """Step 0 of a run starting from `params` (its EMA too)."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params),
                    opt_state=tx.init(params))


def param_layout(run):
  """(abstract parameters, their shardings) of the run's network: an abstract
  initialisation of the network alone, no optimizer, nothing allocated."""
  abstract = jax.eval_shape(functools.partial(_init_params, run),
                            jax.random.key(run.config.seed))
  return abstract, sharding.tree_shardings(abstract, run.mesh)


def state_layout(run, tx):
  """(init, abstract state, shardings): the state's shapes, then shardings,
  without allocating anything."""
  def init(rng):
    return _fresh_state(_init_params(run, rng), tx)

  abstract = jax.eval_shape(init, jax.random.key(run.config.seed))
  return init, abstract, sharding.tree_shardings(abstract, run.mesh)


def init_state(run, tx):
  """A fresh state, created already sharded: a jitted init writes each array
  straight into its shards."""
  init, _, shardings = state_layout(run, tx)
  state = jax.jit(init, out_shardings=shardings)(
      jax.random.key(run.config.seed))
  return state, shardings


def restore_or_init(run, tx, ckpt, init_params=None):
  """The newest checkpoint in the workdir if there is one; else a fresh state,
  whose parameters (and EMA) are `init_params` when given (a student starts
  as its teacher)."""
  init, abstract, shardings = state_layout(run, tx)
  state, step = ckpt.restore_latest_intact(
      checkpoint.abstract_like(abstract, shardings))
  if state is not None:
    logging.info('Resuming from the checkpoint of step %d.', step)
  elif init_params is None:
    state = jax.jit(init, out_shardings=shardings)(
        jax.random.key(run.config.seed))
  else:
    state = jax.jit(functools.partial(_fresh_state, tx=tx),
                    out_shardings=shardings)(init_params)
  return state, shardings


def load_params(run, path, key='ema_params'):
  """(params, their shardings, step): `key` ('ema_params' or 'params') of the
  newest checkpoint at `path`, restored straight into the parameter
  shardings of the run's network; the optimizer state is never read."""
  abstract, shardings = param_layout(run)
  try:
    params, step = checkpoint.load_params(
        path, checkpoint.abstract_like(abstract, shardings), key)
  except checkpoint.CheckpointMismatchError as mismatch:
    row = run.network_row
    if row.other_layout is None:
      raise
    # Saved in the network's other parameter layout (the UViT's middle
    # blocks scanned or not): the same weights, laid out again.
    other_abstract, other_shardings = param_layout(
        run.with_model(row.other_layout(run.model)))
    try:
      params, step = checkpoint.load_params(
          path, checkpoint.abstract_like(other_abstract, other_shardings), key)
    except checkpoint.CheckpointMismatchError:
      raise mismatch from None
    params = jax.device_put(row.relayout(params, run.model), shardings)
  return params, shardings, step


def load_imported(run, path, sha256=''):
  """(params, their shardings) of the run's network from its converted
  weights (e.g. an .npz of `tools/convert_adm.py`)."""
  row = run.network_row
  if row.weights is None:
    raise errors.ConfigError(
        f'config.model {run.config.model.name!r} is not a network imported '
        f'from elsewhere: {path} cannot be its weights.')
  abstract, shardings = param_layout(run)
  params = row.weights.load(path, sha256).params
  if row.weights_scope:
    params = {row.weights_scope: params}
  mismatch = weights.describe_mismatch(weights.flatten(params),
                                       weights.shapes(abstract))
  if mismatch:
    raise weights.WeightsError(f'{path} does not fit config.model: '
                               f'{mismatch}.')
  return jax.device_put(params, shardings), shardings


def load_for_sampling(run, workdir, use_ema=True):
  """(params, their shardings, step) of the newest checkpoint in `workdir`:
  the EMA or the online weights; or config.imported_weights (step 0)."""
  config = run.config
  if config.get('imported_weights'):
    return (*load_imported(run, config.imported_weights), 0)
  try:
    return load_params(run, workdir, 'ema_params' if use_ema else 'params')
  except FileNotFoundError:
    raise errors.CheckpointNotFoundError(
        f'No checkpoint in {workdir}/checkpoints: train first with '
        '--mode=train and the same --workdir.') from None


def load_teacher(run):
  """The teacher's parameters, restored straight into the student's
  parameter shardings: from a workdir's newest checkpoint, or from converted
  weights (an .npz of an imported network's converter). An any-S student's
  boundary embedding, which its teacher lacks, is added as a fresh run
  initialises it: its last projection zero, so the student starts as the
  teacher and the teacher's network, given any boundary, is the teacher."""
  config = run.config
  teacher_run = dataclasses.replace(run, boundary=False)
  if weights.is_npz(config.teacher_checkpoint):
    logging.info('Teacher: imported weights %s.', config.teacher_checkpoint)
    params = load_imported(teacher_run, config.teacher_checkpoint,
                           config.teacher_sha256)[0]
  else:
    params, _, step = load_params(teacher_run, config.teacher_checkpoint,
                                  config.teacher_params)
    logging.info('Teacher: %s of %s, step %d.', config.teacher_params,
                 config.teacher_checkpoint, step)
  return with_boundary(run, params) if run.boundary else params


def with_boundary(run, params):
  """`params` of the teacher's network with what an any-S student's network
  adds to it (the modules at the top of its tree that the teacher lacks:
  its boundary embedding) as a fresh run initialises them, in the
  student's shardings."""
  abstract, shardings = param_layout(run)
  added = sorted(set(abstract) - set(params))

  def init(rng):  # XLA drops the initialisation of everything else.
    fresh = _init_params(run, rng)
    return {k: fresh[k] for k in added}
  init = jax.jit(init, out_shardings={k: shardings[k] for k in added})
  return {**params, **init(jax.random.key(run.config.seed))}
