"""The train loop: the jitted step (loss, AdamW, EMA), and
`train_and_evaluate`, which resumes from the workdir's newest checkpoint,
trains the config's stage and evaluates it as it goes."""

import time

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import optax

from multistep_cm import errors
from multistep_cm import models
from multistep_cm import run as run_lib
from multistep_cm.core import checkpoint
from multistep_cm.core import images
from multistep_cm.core import preemption
from multistep_cm.core import progress as progress_lib
from multistep_cm.core import sharding
from multistep_cm.core import summaries
from multistep_cm.core import state as state_lib
from multistep_cm.core import validation
from multistep_cm.evaluation import quick
from multistep_cm.evaluation import scoring


def ema_decay(step, decay):
  """EMA decay warmed up as (1 + n) / (10 + n): early averages are not
  dominated by the random initialisation."""
  n = step.astype(jnp.float32)
  return jnp.minimum(decay, (1. + n) / (10. + n))


def make_train_step(run, tx, state_shardings):
  """The jitted `(state, batch, teacher_params) -> (state, metrics)` of the
  run's stage and network: compiled once with explicit shardings, the state
  donated, randomness from (seed, step) so a resumed run repeats itself.
  `teacher_params` is None for stages that do not run the teacher (teacher,
  ct)."""
  config, stage, mesh = run.config, run.stage, run.mesh
  loss_fn = stage.make_loss(run, run.network)
  lr_fn = state_lib.learning_rate_fn(config.optim)
  batch_sh = sharding.batch_sharding(mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  teacher_sh = state_shardings.params if stage.runs_teacher else None

  def step_fn(state, batch, teacher_params):
    rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
    # The mesh in context, for the network's own sharding constraints.
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state.params, state, teacher_params, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    d = ema_decay(state.step, config.optim.ema_decay)
    ema = jax.tree.map(lambda e, p: d * e + (1. - d) * p, state.ema_params,
                       params)
    new_state = state_lib.TrainState(step=state.step + 1, params=params,
                                     ema_params=ema, opt_state=opt_state)
    # With the loss and gradient, the update's norm: finite updates of
    # finite parameters keep the new parameters (and EMA) finite.
    out = {'loss': loss, 'grad_norm': optax.tree.norm(grads),
           'update_norm': optax.tree.norm(updates), 'lr': lr_fn(state.step),
           **aux}
    return new_state, out

  return jax.jit(step_fn, in_shardings=(state_shardings, batch_sh, teacher_sh),
                 out_shardings=(state_shardings, replicated),
                 donate_argnums=(0,))


def _fmt(d):
  return ', '.join(f'{k} {v:.4g}' for k, v in d.items())


def evaluate(run, quick_eval, training_fid, params, step, workdir, writer):
  """The quick evaluation of the EMA parameters (plus FID where configured):
  logged, written to TensorBoard, and a PNG grid of the first samples."""
  t0 = time.time()
  samples, scores = quick_eval(params)
  if training_fid is not None:
    scores.update(training_fid(params))  # On evaluate.train_samples.
  if jax.process_index() == 0:
    n = run.config.train_eval.grid_size
    path = epath.Path(workdir) / 'samples' / f'step_{step:07d}.png'
    images.save_samples_png(path, samples[:n], quick_eval.labels[:n],
                            run.dataset.grid_columns,
                            title=f'step {step}')
    logging.info('Step %d: wrote %s; %s (%.1fs, %d samples, %s)', step, path,
                 _fmt(scores), time.time() - t0, len(samples),
                 quick_eval.spec.name)
    writer.write_png(step, 'samples', path.read_bytes())
  writer.write_scalars(step, {f'eval/{k}': v for k, v in scores.items()})
  return scores


class DivergedError(errors.UserError):
  """A non-finite loss, gradient or update: nothing from that step on is
  saved."""


def _check_finite(outs, first_step, ckpt):
  """Raises DivergedError, naming the step, if any of the steps' outputs
  (host values of steps first_step, first_step + 1, ...) is not finite."""
  for step, out in enumerate(outs, first_step):
    bad = {k: out[k] for k in ('loss', 'grad_norm', 'update_norm')
           if not np.isfinite(out[k])}
    if bad:
      ckpt.wait()  # A save in flight is of a good step: let it finish.
      good = ckpt.latest_step()
      raise DivergedError(
          f'{_fmt(bad)} at step {step}; nothing non-finite was saved, the '
          'newest good checkpoint is ' +
          (f'step {good}.' if good is not None else 'none (no step saved).'))


def train_and_evaluate(config, workdir):
  """Trains (resuming from the workdir if it holds a checkpoint) and evaluates.

  Returns the final train state and the last evaluation's metrics. Raises
  preemption.Preempted after saving the step a preemption notice stopped at.
  `config`: or its `run.Run`.
  """
  run = run_lib.of(config)
  config, stage, mesh = run.config, run.stage, run.mesh
  validation.check_run(run, workdir)  # Before anything is written.
  tx = state_lib.make_optimizer(config.optim)
  teacher = state_lib.load_teacher(run) if stage.distilled else None
  ckpt = checkpoint.Checkpointer(epath.Path(workdir) / 'checkpoints',
                                 config.ckpt_every, config.keep_checkpoints)
  state, state_sh = state_lib.restore_or_init(run, tx, ckpt, teacher)
  if not stage.runs_teacher:
    teacher = None  # CT starts from the teacher but never evaluates it.
  start = int(jax.device_get(state.step))
  # Only a start that got this far records its config and metrics.
  writer = (summaries.Writer(workdir) if jax.process_index() == 0
            else summaries.NullWriter())
  if jax.process_index() == 0:
    text = config.to_json_best_effort(indent=2)
    (epath.Path(workdir) / 'config.json').write_text(text)
    # Indented four spaces: TensorBoard renders text as markdown.
    writer.write_text(start, 'config', '    ' + text.replace('\n', '\n    '))
  logging.info('Mesh %s; %d parameters; starting at step %d of %d.',
               dict(mesh.shape), models.count_params(state.params), start,
               config.total_steps)

  train_step = make_train_step(run, tx, state_sh)
  batches = run.dataset.train_batches(
      config.batch_size, config.seed, start,
      sharding.process_rows(config.batch_size, mesh))
  quick_eval = quick.QuickEval(run, state_sh.ema_params, quick.SEED_TRAINING)
  training_fid = scoring.training_fid(run, state_sh.ema_params,
                                      quick_eval.spec)
  floor = quick_eval.scorer.floor()
  if floor:
    logging.info('The floor, %s, scores %s.', quick_eval.scorer.floor_label,
                 _fmt(floor))
    writer.write_scalars(start, {f'eval/floor_{k}': v for k, v in floor.items()})

  progress = progress_lib.Progress(start, config.total_steps)
  # Step outputs stay on the devices until a log, save or evaluation needs
  # the host: the non-finite check costs no extra sync per step.
  unchecked, logged = [], []
  scores = {}
  first, last_traced = tuple(config.get('profile_steps') or ()) or (0, -1)
  with preemption.Notice() as notice:
    for step in range(start + 1, config.total_steps + 1):
      if step == first:
        jax.profiler.start_trace(str(epath.Path(workdir) / 'profile'))
      state, out = train_step(
          state, sharding.global_batch(next(batches), mesh), teacher)
      if step == last_traced and step >= first > start:
        jax.block_until_ready(out)  # The trace holds the step's work.
        jax.profiler.stop_trace()
        logging.info('Wrote a profile of steps %d to %d to %s/profile.',
                     first, step, workdir)
      unchecked.append(out)
      last = step == config.total_steps
      preempted = notice.reached(step, ckpt)
      save = last or preempted or ckpt.should_save(step)
      evaluate_now = step % config.eval_every == 0 or last
      if not (save or evaluate_now or step % config.log_every == 0):
        continue
      host = jax.device_get(unchecked)
      _check_finite(host, step - len(unchecked) + 1, ckpt)
      logged += host
      unchecked = []
      if step % config.log_every == 0 or last:
        means = {k: float(np.mean([m[k] for m in logged])) for k in logged[0]}
        logged = []
        rate, eta = progress.update(step)
        writer.write_scalars(step, {**{f'train/{k}': v for k, v in
                                       means.items()},
                                    'train/steps_per_sec': rate})
        # The scalars reach the console through the writer; this adds
        # progress.
        logging.info('Step %d/%d (%.0f%%), %.2f steps/s, ETA %s', step,
                     config.total_steps, 100 * step / config.total_steps, rate,
                     progress_lib.format_eta(eta))
      if save:
        try:
          if last or preempted:
            ckpt.save_now(step, state)
          else:
            ckpt.save(step, state, force=True)
        except errors.StorageError as e:
          if not preempted:
            raise
          # Not Preempted, which says the step is saved. A full disk exits
          # 1, for a person to mend (a requeued run would train to its next
          # save and fail there again); storage that kept failing after its
          # retries exits 75, as a lost host does.
          raise type(e)(
              f'{e} A preemption notice stopped the run at step {step}, '
              'which is not saved.') from e.__cause__
      if preempted:
        ckpt.close()
        writer.close()
        raise preemption.Preempted(step)
      if evaluate_now:
        scores = evaluate(run, quick_eval, training_fid, state.ema_params,
                          step, workdir, writer)
  ckpt.wait()
  ckpt.close()
  if start == config.total_steps and not scores:
    logging.info('The checkpoint already has all %d steps; evaluating it.',
                 config.total_steps)
    scores = evaluate(run, quick_eval, training_fid, state.ema_params,
                      start, workdir, writer)
  writer.close()
  return state, {**scores, **{f'floor_{k}': v for k, v in floor.items()}}
