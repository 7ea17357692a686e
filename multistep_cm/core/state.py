"""What a run holds, built from its config: the model, the optimizer, the
device mesh, and the train state, laid out as shapes, then shardings, then
arrays; restoring it, or only its parameters."""

from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
import optax

from multistep_cm import datasets
from multistep_cm import models
from multistep_cm import networks
from multistep_cm import schedules
from multistep_cm.core import checkpoint
from multistep_cm import errors
from multistep_cm.core import imported
from multistep_cm.core import sharding


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly: one pytree, one checkpoint."""
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


def condition(config):
  """What the config's network is conditioned on: its dataset's
  `conditioning.Condition`."""
  return datasets.get(config).condition


def create_model(config):
  cfg = dict(config.model)
  cfg['out_channels'] = config.dataset.channels
  return networks.create_model(cfg, condition(config),
                               schedules.get_logsnr_fn(**config.schedule))


def network(config):
  """The config's model as the plain function losses and samplers take."""
  return models.network_fn(create_model(config))


def data_shape(config):
  """Shape of one example: (H, W, C) images, or (C,) points."""
  return datasets.get(config).shape


def learning_rate_fn(optim):
  """Linear warmup, then constant: fine for the paper's fine-tuning (spec A5),
  and it makes a run's schedule independent of its length."""
  return optax.linear_schedule(0., optim.lr, max(1, optim.warmup_steps))


def make_optimizer(optim):
  return optax.chain(
      optax.clip_by_global_norm(optim.grad_clip),
      optax.adamw(learning_rate_fn(optim), b1=optim.b1, b2=optim.b2,
                  eps=optim.eps, weight_decay=optim.weight_decay))


def make_mesh(config):
  try:
    return sharding.make_mesh(config.mesh.axes, config.mesh.shape)
  except ValueError as e:
    raise errors.ConfigError(f'config.mesh: {e}') from None


def state_layout(config, model, tx, mesh):
  """(init, abstract state, shardings): the state's shapes, then shardings,
  without allocating anything."""
  shape = (1,) + data_shape(config)

  def init(rng):
    params = model.init(rng, jnp.zeros(shape), jnp.zeros((1,)),
                        condition(config).example(1))['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=jax.tree.map(jnp.copy, params),
                      opt_state=tx.init(params))

  abstract = jax.eval_shape(init, jax.random.key(config.seed))
  return init, abstract, sharding.tree_shardings(abstract, mesh)


def init_state(config, model, tx, mesh):
  """A fresh state, created already sharded: a jitted init writes each array
  straight into its shards."""
  init, _, shardings = state_layout(config, model, tx, mesh)
  state = jax.jit(init, out_shardings=shardings)(jax.random.key(config.seed))
  return state, shardings


def restore_or_init(config, model, tx, mesh, ckpt, init_params=None):
  """The newest checkpoint in the workdir if there is one; else a fresh state,
  whose parameters (and EMA) are `init_params` when given (a student starts
  as its teacher)."""
  _, abstract, shardings = state_layout(config, model, tx, mesh)
  state, step = ckpt.restore_latest_intact(
      checkpoint.abstract_like(abstract, shardings))
  if state is not None:
    logging.info('Resuming from the checkpoint of step %d.', step)
    return state, shardings
  if init_params is None:
    return init_state(config, model, tx, mesh)
  state = jax.jit(
      lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                           ema_params=jax.tree.map(jnp.copy, p),
                           opt_state=tx.init(p)),
      out_shardings=shardings)(init_params)
  return state, shardings


def load_params(config, path, mesh, key='ema_params'):
  """(params, their shardings, step): `key` ('ema_params' or 'params') of the
  newest checkpoint at `path`, restored straight into the parameter
  shardings of the config's model; the optimizer state is never read."""
  model = create_model(config)
  _, abstract, shardings = state_layout(config, model,
                                        make_optimizer(config.optim), mesh)
  try:
    params, step = checkpoint.load_params(
        path, checkpoint.abstract_like(abstract.params, shardings.params), key)
  except checkpoint.CheckpointMismatchError as mismatch:
    if config.model.name != 'uvit':
      raise
    # Saved with the middle blocks scanned when the config has them unscanned
    # (or the reverse): the same weights in the other layout.
    other = config.copy_and_resolve_references()
    with other.unlocked():
      other.model.scan = not config.model.get('scan', False)
    _, other_abstract, other_shardings = state_layout(
        other, create_model(other), make_optimizer(other.optim), mesh)
    try:
      params, step = checkpoint.load_params(
          path, checkpoint.abstract_like(other_abstract.params,
                                         other_shardings.params), key)
    except checkpoint.CheckpointMismatchError:
      raise mismatch from None
    params = jax.device_put(models.relayout(params, model.config),
                            shardings.params)
  return params, shardings.params, step


def load_imported(config, path, mesh, sha256=''):
  """(params, their shardings) of the config's network from converted
  weights (an .npz of `tools/convert_adm.py`)."""
  _, abstract, shardings = state_layout(
      config, create_model(config), make_optimizer(config.optim), mesh)
  params = imported.adm_network_params(path, abstract.params, sha256)
  return jax.device_put(params, shardings.params), shardings.params


def load_for_sampling(config, workdir, mesh, use_ema=True):
  """(params, their shardings, step) of the newest checkpoint in `workdir`:
  the EMA or the online weights; or config.imported_weights (step 0)."""
  if config.get('imported_weights'):
    return (*load_imported(config, config.imported_weights, mesh), 0)
  try:
    return load_params(config, workdir, mesh,
                       'ema_params' if use_ema else 'params')
  except FileNotFoundError:
    raise errors.CheckpointNotFoundError(
        f'No checkpoint in {workdir}/checkpoints: train first with '
        '--mode=train and the same --workdir.') from None


def load_teacher(config, mesh):
  """The teacher's parameters, restored straight into the student's
  parameter shardings: from a workdir's newest checkpoint, or from converted
  weights (an .npz of `tools/convert_adm.py`)."""
  if imported.is_npz(config.teacher_checkpoint):
    logging.info('Teacher: imported weights %s.', config.teacher_checkpoint)
    return load_imported(config, config.teacher_checkpoint, mesh,
                         config.teacher_sha256)[0]
  params, _, step = load_params(config, config.teacher_checkpoint, mesh,
                                config.teacher_params)
  logging.info('Teacher: %s of %s, step %d.', config.teacher_params,
               config.teacher_checkpoint, step)
  return params
