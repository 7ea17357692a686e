"""Quality against student steps: CD, CT and progressive distillation for
S in {1, 2, 4, 8, 16} from one teacher, the small-scale counterpart of the
paper's Tables 1 and 3.

  python -m multistep_cm.sweep --config=configs/digits.py --workdir=/tmp/digits

Reuses (or trains) WORKDIR/teacher, trains each student in
WORKDIR/sweep/<stage>_s<S>
(PD as a chain of halvings: S = 16 from the teacher sampled with 32 aDDIM
steps, 8 from 16, ..., 1 from 2), and writes WORKDIR/sweep.md and
WORKDIR/sweep.png. Every run resumes after a crash and finished ones are
skipped, so rerunning the command only does what is missing.
"""

import json
import os

from absl import app
from absl import flags
from absl import logging
import jax
import matplotlib
from ml_collections import config_flags

from multistep_cm import models
from multistep_cm import pipeline
from multistep_cm import train

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

config_flags.DEFINE_config_file('config', 'configs/digits.py', 'Config file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory shared with the main command.')
flags.DEFINE_list('steps', ['1', '2', '4', '8', '16'], 'Student steps S.')
flags.DEFINE_list('stages', ['cd', 'ct', 'pd'], 'Methods to sweep.')
flags.DEFINE_integer('train_steps', None, 'Training steps of each student '
                     '(and of each PD phase); default config.student.')
flags.mark_flag_as_required('workdir')
FLAGS = flags.FLAGS


def _config(config, workdir, stage, steps, teacher_dir=None, train_steps=None):
  c = pipeline.stage_config(config, stage,
                            teacher_dir or os.path.join(workdir, 'teacher'))
  c.unlock()
  c.student_steps = steps
  if train_steps:
    c.total_steps = train_steps
    c.consistency.anneal_steps = max(1, train_steps // 2)  # Spec A14.
    c.eval_every = train_steps
  c.lock()
  return c


def _evaluate(c, directory, mesh):
  """Scores of a finished student with its own S-step sampler."""
  model, params, sh, _ = train.restore_for_sampling(c, directory, mesh)
  sampler = train.make_sampler(c, models.network_fn(model), sh, mesh)
  samples, labels = train.generate(c, sampler, params, mesh,
                                   c.eval.num_samples, c.seed + 3)
  return train.sample_metrics(c, samples, labels)


def sweep(config, workdir, steps, stages, train_steps=None):
  teacher = pipeline.stage_config(config, 'teacher')
  train.train_and_evaluate(teacher, pipeline.stage_dir(workdir, teacher))
  results_path = os.path.join(workdir, 'sweep.json')
  results = {}
  if os.path.exists(results_path):
    with open(results_path) as f:
      results = json.load(f)
  mesh = train.make_mesh(config)
  root = os.path.join(workdir, 'sweep')
  plan = [(stage, s, None) for stage in stages if stage != 'pd'
          for s in steps]
  if 'pd' in stages:
    # Each PD phase halves the steps of the one before; the first halves the
    # teacher's 2 S_max aDDIM steps.
    prev = None
    for s in sorted(steps, reverse=True):
      plan.append(('pd', s, prev))
      prev = pipeline.stage_dir(root, _config(config, workdir, 'pd', s,
                                              train_steps=train_steps))
  for stage, s, teacher_dir in plan:
    c = _config(config, workdir, stage, s, teacher_dir, train_steps)
    key = f'{stage}_s{s}'
    if key in results:
      continue
    directory = pipeline.stage_dir(root, c)
    logging.info('=== %s, S = %d, in %s ===', stage.upper(), s, directory)
    train.train_and_evaluate(c, directory)
    results[key] = {'stage': stage, 'steps': s, **_evaluate(c, directory, mesh)}
    if jax.process_index() == 0:
      with open(results_path, 'w') as f:
        json.dump(results, f, indent=1)
  return results


def write_report(results, workdir, steps, stages, floor):
  metrics = [m for m in ('fd_digits', 'class_accuracy', 'swd') if any(
      m in r for r in results.values())]
  lines = []
  for m in metrics:
    lines.append(f'| {m} | ' + ' | '.join(f'S={s}' for s in steps) + ' |')
    lines.append('|---|' + '---|' * len(steps))
    for stage in stages:
      vals = [results.get(f'{stage}_s{s}', {}).get(m) for s in steps]
      lines.append(f'| {stage.upper()} | ' + ' | '.join(
          '-' if v is None else f'{v:.4g}' for v in vals) + ' |')
    lines.append('')
  table = '\n'.join(lines)
  with open(os.path.join(workdir, 'sweep.md'), 'w') as f:
    f.write(table)
  print('\n' + table, flush=True)

  fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8),
                           dpi=100)
  for ax, m in zip(axes if len(metrics) > 1 else [axes], metrics):
    for stage in stages:
      pts = [(s, results[f'{stage}_s{s}'][m]) for s in steps
             if f'{stage}_s{s}' in results]
      if pts:
        ax.plot(*zip(*pts), marker='o', label=stage.upper())
    if m in floor:
      ax.axhline(floor[m], color='gray', ls='--', label='real held-out')
    # Distances span orders of magnitude between 1 and 16 steps.
    ax.set(xscale='log', xlabel='student steps S', ylabel=m,
           yscale='log' if m in ('fd_digits', 'swd') else 'linear')
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'sweep.png'))
  plt.close(fig)


def main(argv):
  del argv
  steps = [int(s) for s in FLAGS.steps]
  results = sweep(FLAGS.config, FLAGS.workdir, steps, FLAGS.stages,
                  FLAGS.train_steps)
  write_report(results, FLAGS.workdir, steps, FLAGS.stages,
               train.floor_metrics(FLAGS.config))


if __name__ == '__main__':
  app.run(main)
