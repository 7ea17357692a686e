"""The train loop of the diffusion teacher, and the pieces sampling shares
with it (model, state, mesh, checkpoint restore)."""

import functools
import json
import os
import time
from typing import Any

from absl import logging
from clu import metric_writers
from etils import epath
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from multistep_cm import checkpoint
from multistep_cm import data
from multistep_cm import digits_classifier
from multistep_cm import fid
from multistep_cm import images
from multistep_cm import losses
from multistep_cm import metrics as metrics_lib
from multistep_cm import models
from multistep_cm import progress as progress_lib
from multistep_cm import samplers
from multistep_cm import schedules
from multistep_cm import sharding


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly: one pytree, one checkpoint."""
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


# ----------------------------------------------------------------------------
# Building blocks, from the config.
# ----------------------------------------------------------------------------


def create_model(config):
  cfg = dict(config.model)
  cfg['num_classes'] = config.dataset.num_classes
  cfg['out_channels'] = config.dataset.channels
  return models.create_model(cfg)


def logsnr_fn(config):
  return schedules.get_logsnr_fn(**config.schedule)


def data_shape(config):
  """Shape of one example: (H, W, C) images, or (C,) points for toy2d."""
  if config.model.name == 'mlp':
    return (config.dataset.channels,)
  s = config.dataset.image_size
  return (s, s, config.dataset.channels)


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
  return sharding.make_mesh(config.mesh.axes, config.mesh.shape)


def state_layout(config, model, tx, mesh):
  """(init, abstract state, shardings): the state's shapes, then shardings,
  without allocating anything."""
  shape = (1,) + data_shape(config)

  def init(rng):
    params = model.init(rng, jnp.zeros(shape), jnp.zeros((1,)),
                        jnp.zeros((1,), jnp.int32))['params']
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
  step = ckpt.latest_step()
  if step is not None:
    logging.info('Resuming from the checkpoint of step %d.', step)
    return ckpt.restore(checkpoint.abstract_like(abstract, shardings),
                        step), shardings
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
  _, abstract, shardings = state_layout(config, create_model(config),
                                        make_optimizer(config.optim), mesh)
  params, step = checkpoint.load_params(
      path, checkpoint.abstract_like(abstract.params, shardings.params), key)
  return params, shardings.params, step


def restore_for_sampling(config, workdir, mesh, use_ema=True):
  """(model, params, their shardings, step) of the newest checkpoint in
  `workdir`: the EMA or the online weights."""
  try:
    params, shardings, step = load_params(
        config, workdir, mesh, 'ema_params' if use_ema else 'params')
  except FileNotFoundError:
    raise FileNotFoundError(
        f'No checkpoint in {workdir}/checkpoints: train first with '
        '--mode=train and the same --workdir.') from None
  return create_model(config), params, shardings, step


STAGES = ('teacher', 'cd', 'ct', 'pd')


class ConfigError(ValueError):
  """A config that cannot run, reported to the user in one line."""


def check_stage(config):
  if config.stage not in STAGES:
    raise ConfigError(f'Unknown stage {config.stage!r}: expected one of '
                     f'{", ".join(STAGES)}.')
  if config.stage != 'teacher' and not config.teacher_checkpoint:
    raise ConfigError(f'Stage {config.stage!r} starts from a teacher: set '
                     'config.teacher_checkpoint to its workdir.')


def load_teacher(config, mesh):
  """The teacher's parameters, restored straight into the student's
  parameter shardings."""
  params, _, step = load_params(config, config.teacher_checkpoint, mesh,
                                config.teacher_params)
  logging.info('Teacher: %s of %s, step %d.', config.teacher_params,
               config.teacher_checkpoint, step)
  return params


def make_loss_fn(config, network):
  """`(params, state, teacher_params, batch, rng) -> (loss, aux)` of the stage."""
  lfn = logsnr_fn(config)
  k = config.dataset.num_classes
  cc = config.consistency
  if config.stage == 'teacher':
    def loss_fn(params, state, teacher_params, batch, rng):
      del state, teacher_params
      return losses.diffusion_loss(
          network, params, batch['x'], batch['label'], rng, lfn,
          config.loss.label_dropout, k, config.loss.multiscale), {}
  elif config.stage in ('cd', 'ct'):
    def loss_fn(params, state, teacher_params, batch, rng):
      target = state.ema_params if cc.target == 'ema' else None
      return losses.multistep_consistency_loss(
          network, params, batch['x'], batch['label'], rng, lfn,
          config.student_steps, state.step, target_params=target,
          anneal_start=cc.anneal_start, anneal_end=cc.anneal_end,
          anneal_steps=cc.anneal_steps, mode=config.stage, teacher=network,
          teacher_params=teacher_params, xvar_frac=cc.xvar_frac,
          huber_delta=cc.huber_delta, norm=cc.norm, weighting=cc.weighting,
          guidance=cc.guidance, num_classes=k)
  else:
    def loss_fn(params, state, teacher_params, batch, rng):
      del state
      return losses.progressive_distillation_loss(
          network, params, network, teacher_params, batch['x'],
          batch['label'], rng, lfn, config.student_steps, cc.xvar_frac,
          cc.guidance, k), {}
  return loss_fn


def ema_decay(step, decay):
  """EMA decay warmed up as (1 + n) / (10 + n): early averages are not
  dominated by the random initialisation."""
  n = step.astype(jnp.float32)
  return jnp.minimum(decay, (1. + n) / (10. + n))


def make_train_step(config, network, tx, state_shardings, mesh):
  """The jitted `(state, batch, teacher_params) -> (state, metrics)`: compiled
  once with explicit shardings, the state donated, randomness from
  (seed, step) so a resumed run repeats itself. `teacher_params` is None for
  stages without a teacher network (teacher, ct)."""
  loss_fn = make_loss_fn(config, network)
  lr_fn = learning_rate_fn(config.optim)
  batch_sh = sharding.batch_sharding(mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  teacher_sh = state_shardings.params if needs_teacher(config) else None

  def step_fn(state, batch, teacher_params):
    rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state, teacher_params, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    d = ema_decay(state.step, config.optim.ema_decay)
    ema = jax.tree.map(lambda e, p: d * e + (1. - d) * p, state.ema_params,
                       params)
    new_state = TrainState(step=state.step + 1, params=params, ema_params=ema,
                           opt_state=opt_state)
    out = {'loss': loss, 'grad_norm': optax.tree.norm(grads),
           'lr': lr_fn(state.step), **aux}
    return new_state, out

  return jax.jit(step_fn, in_shardings=(state_shardings, batch_sh, teacher_sh),
                 out_shardings=(state_shardings, replicated),
                 donate_argnums=(0,))


def needs_teacher(config):
  """Whether the stage evaluates the teacher network during training."""
  return config.stage in ('cd', 'pd')


# ----------------------------------------------------------------------------
# Sampling and evaluation.
# ----------------------------------------------------------------------------


def eval_labels(config, n):
  """Labels cycling through the classes: uniform, and one class per grid column."""
  k = config.dataset.num_classes
  return (np.arange(n) % k if k else np.zeros(n)).astype(np.int32)


def eval_sampler(config):
  """(kind, steps) a stage is evaluated with: the configured diffusion
  sampler for a teacher; S plain DDIM steps (Alg. 2) for a student."""
  if config.stage == 'teacher':
    return config.eval.sampler, config.eval.steps
  return 'ddim', config.student_steps


def example_noise(seed_start, n, shape):
  """Noise of examples start, ..., start + n - 1 (`seed_start` = (seed,
  start)), row j from its own key: a sample's noise does not depend on the
  batch, the batch size or the mesh it is drawn in."""
  key = jax.random.key(seed_start[0])
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i),
                                              shape))(seed_start[1] +
                                                      jnp.arange(n))


def make_sampler(config, network, param_shardings, mesh, steps=None,
                 kind=None, guidance=None, per_example_noise=False):
  """A jitted `(params, rng, labels) -> samples` with the batch sharded;
  with `per_example_noise`, `rng` is an int array (seed, index of the first
  example) for `example_noise`."""
  lfn = logsnr_fn(config)
  default_kind, default_steps = eval_sampler(config)
  steps = default_steps if steps is None else steps
  kind = default_kind if kind is None else kind
  guidance = config.eval.guidance if guidance is None else guidance
  if kind not in ('ddim', 'addim'):
    raise ValueError(f'Unknown sampler {kind!r}: expected ddim or addim.')
  batch_sh = sharding.batch_sharding(mesh)
  shape = data_shape(config)

  def sample(params, rng, labels):
    if per_example_noise:
      noise = example_noise(rng, labels.shape[0], shape)
    else:
      noise = jax.random.normal(rng, labels.shape + shape)
    noise = jax.lax.with_sharding_constraint(noise, batch_sh)
    return samplers.diffusion_sample(
        network, params, noise, labels, lfn, steps, kind, guidance,
        config.dataset.num_classes)

  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  return jax.jit(sample, in_shardings=(param_shardings, replicated, batch_sh),
                 out_shardings=batch_sh)


def generate(config, sampler, params, mesh, n, seed):
  """n samples in batches of config.eval.batch_size (padded to fit the mesh)."""
  labels = eval_labels(config, n)
  bs = sharding.mesh_batch_size(config.eval.batch_size, mesh)
  out = []
  for i, batch, rows in sharding.padded_batches(labels, bs, mesh):
    x = sampler(params, jax.random.fold_in(jax.random.key(seed), i), batch)
    out.append(sharding.to_host(x, rows))
  return np.concatenate(out), labels


def sample_metrics(config, samples, labels):
  """The quality metrics of the dataset, or {} where none is built in."""
  if config.dataset.name == 'digits':
    return digits_classifier.evaluate(samples, labels)
  if config.dataset.name == 'toy2d':
    return metrics_lib.toy2d_metrics(samples)
  return {}


def floor_metrics(config):
  if config.dataset.name == 'digits':
    return digits_classifier.floor()
  if config.dataset.name == 'toy2d':
    return metrics_lib.toy2d_floor(config.eval.num_samples)
  return {}


def evaluate(config, sampler, params, mesh, step, workdir, writer,
             training_fid=None):
  """Samples with the EMA parameters, logs the metrics, writes a PNG grid."""
  t0 = time.time()
  samples, labels = generate(config, sampler, params, mesh,
                             config.eval.num_samples, config.seed + 1)
  scores = sample_metrics(config, samples, labels)
  if training_fid is not None:
    scores['fid'] = training_fid(params)  # On evaluate.train_samples.
  if jax.process_index() == 0:
    n = config.eval.grid_size
    path = os.path.join(workdir, 'samples', f'step_{step:07d}.png')
    images.save_samples_png(path, samples[:n], labels[:n],
                            config.dataset.num_classes, title=f'step {step}')
    logging.info('Step %d: wrote %s; %s (%.1fs, %d samples, %s %d steps)',
                 step, path, _fmt(scores), time.time() - t0, len(samples),
                 *eval_sampler(config))
  writer.write_scalars(step, {f'eval/{k}': v for k, v in scores.items()})
  return scores


def _fmt(d):
  return ', '.join(f'{k} {v:.4g}' for k, v in d.items())


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------


def train_and_evaluate(config, workdir):
  """Trains (resuming from the workdir if it holds a checkpoint) and evaluates.

  Returns the final train state and the last evaluation's metrics.
  """
  check_stage(config)  # Fail before anything is compiled.
  data.check_available(config.dataset)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  if jax.process_index() == 0:
    (epath.Path(workdir) / 'config.json').write_text(
        config.to_json_best_effort(indent=2))

  mesh = make_mesh(config)
  model = create_model(config)
  network = models.network_fn(model)
  tx = make_optimizer(config.optim)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                 config.ckpt_every, config.keep_checkpoints)
  teacher = None
  if config.stage != 'teacher':
    teacher = load_teacher(config, mesh)
  state, state_sh = restore_or_init(config, model, tx, mesh, ckpt, teacher)
  if not needs_teacher(config):
    teacher = None  # CT starts from the teacher but never evaluates it.
  start = int(jax.device_get(state.step))
  logging.info('Mesh %s; %d parameters; starting at step %d of %d.',
               dict(mesh.shape), models.count_params(state.params), start,
               config.total_steps)

  train_step = make_train_step(config, network, tx, state_sh, mesh)
  sampler = make_sampler(config, network, state_sh.ema_params, mesh)
  batches = data.train_batches(config.dataset, config.batch_size, config.seed,
                               start)
  training_fid = None
  if fid.TrainingFID.enabled(config):
    training_fid = fid.TrainingFID(
        config, sampler, state_sh.ema_params, mesh,
        eval_labels(config, config.evaluate.train_samples))
  elif config.dataset.name not in data.EMBEDDED:
    logging.info('No FID during training: set config.evaluate.'
                 'inception_weights and config.evaluate.reference for it.')
  floor = floor_metrics(config)
  if floor:
    logging.info('Real held-out data scores (the floor): %s', _fmt(floor))
    writer.write_scalars(start, {f'eval/floor_{k}': v for k, v in floor.items()})

  progress = progress_lib.Progress(start, config.total_steps)
  pending, scores = [], {}
  for step in range(start + 1, config.total_steps + 1):
    state, out = train_step(state, sharding.global_batch(next(batches), mesh),
                            teacher)
    pending.append(out)
    last = step == config.total_steps
    if step % config.log_every == 0 or last:
      logged = {k: float(np.mean([m[k] for m in jax.device_get(pending)]))
                for k in pending[0]}
      pending = []
      if not np.isfinite(logged['loss']):
        raise FloatingPointError(f'Loss is {logged["loss"]} at step {step}.')
      rate, eta = progress.update(step)
      writer.write_scalars(step, {**{f'train/{k}': v for k, v in
                                     logged.items()},
                                  'train/steps_per_sec': rate})
      # The scalars reach the console through the writer; this adds progress.
      logging.info('Step %d/%d (%.0f%%), %.2f steps/s, ETA %s', step,
                   config.total_steps, 100 * step / config.total_steps, rate,
                   progress_lib.format_eta(eta))
    ckpt.save(step, state, force=last)
    if ckpt.reached_preemption(step):
      ckpt.wait()
      raise SystemExit(f'Preempted: saved step {step}; rerun to resume.')
    if step % config.eval_every == 0 or last:
      scores = evaluate(config, sampler, state.ema_params, mesh, step, workdir,
                        writer, training_fid)
  ckpt.wait()
  ckpt.close()
  writer.flush()
  if start == config.total_steps and not scores:
    logging.info('The checkpoint already has all %d steps; evaluating it.',
                 config.total_steps)
    scores = evaluate(config, sampler, state.ema_params, mesh, start, workdir,
                      writer, training_fid)
  return state, {**scores, **{f'floor_{k}': v for k, v in floor.items()}}
