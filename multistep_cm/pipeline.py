"""The embedded default, end to end: train the teacher, distil a student,
compare the student with the teacher's samplers.

Each stage runs in its own sub-directory of the workdir and resumes there
after a crash; each row of the comparison is stored once computed, so a
restarted comparison only computes what is missing.
"""

import json
import os

from absl import logging
import jax
import matplotlib
import numpy as np

from multistep_cm import images
from multistep_cm import models
from multistep_cm import samplers
from multistep_cm import train

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position


def stage_config(config, stage, teacher_checkpoint=None):
  """The config of one stage. A student trains on the `config.student`
  schedule, from `teacher_checkpoint` when given (else the configured one)."""
  c = config.copy_and_resolve_references()
  c.unlock()
  c.stage = stage
  c.pipeline = ()
  if stage != 'teacher':
    c.teacher_checkpoint = teacher_checkpoint or config.teacher_checkpoint
    c.total_steps = config.student.total_steps
    c.optim.lr = config.student.lr
    c.optim.warmup_steps = config.student.warmup_steps
    c.eval_every = config.student.eval_every
  c.lock()
  return c


def stage_dir(workdir, config):
  if config.stage == 'teacher':
    return os.path.join(workdir, 'teacher')
  return os.path.join(workdir, f'{config.stage}_s{config.student_steps}')


def compare(config, workdir, student):
  """The table: the student's S steps against the teacher's aDDIM and DDIM
  at `config.compare.teacher_steps`, plus the real held-out floor."""
  path = os.path.join(workdir, 'comparison.json')
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      rows = json.load(f)
  done = {r['name'] for r in rows}
  mesh = train.make_mesh(config)
  runs = [(f'student ({student.stage.upper()}, S={student.student_steps})',
           student, stage_dir(workdir, student), 'ddim',
           student.student_steps)]
  teacher = stage_config(config, 'teacher')
  for steps in config.compare.teacher_steps:
    for kind in ('addim', 'ddim'):
      runs.append((f'teacher {kind} {steps}', teacher,
                   stage_dir(workdir, teacher), kind, steps))
  grids = {}
  for name, cfg, directory, kind, steps in runs:
    if name in done and os.path.exists(_grid_path(workdir, name)):
      continue
    model, params, sh, _ = train.restore_for_sampling(cfg, directory, mesh)
    sampler = train.make_sampler(cfg, models.network_fn(model), sh, mesh,
                                 steps=steps, kind=kind)
    samples, labels = train.generate(cfg, sampler, params, mesh,
                                     cfg.eval.num_samples, cfg.seed + 3)
    scores = train.sample_metrics(cfg, samples, labels)
    row = {'name': name, 'sampler': kind, 'steps': steps,
           'nfe': samplers.nfe(steps, cfg.eval.guidance,
                               cfg.dataset.num_classes), **scores}
    rows = [r for r in rows if r['name'] != name] + [row]
    os.makedirs(os.path.dirname(_grid_path(workdir, name)), exist_ok=True)
    np.save(_grid_path(workdir, name), samples[:cfg.eval.grid_size])
    if jax.process_index() == 0:
      with open(path, 'w') as f:
        json.dump(rows, f, indent=1)
    logging.info('%s: %s', name, scores)
  for name, *_ in runs:
    grids[name] = np.load(_grid_path(workdir, name))
  floor = {'name': 'real held-out digits', 'sampler': '-', 'steps': '-',
           'nfe': '-', **train.floor_metrics(config)}
  order = [r for name, *_ in runs for r in rows if r['name'] == name]
  table = format_table(order + [floor])
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'comparison.md'), 'w') as f:
      f.write(table + '\n')
    side_by_side(os.path.join(workdir, 'comparison.png'), grids,
                 config.dataset.num_classes)
  print('\n' + table + '\n', flush=True)
  return order


def _grid_path(workdir, name):
  safe = ''.join(c if c.isalnum() else '_' for c in name)
  return os.path.join(workdir, 'grids', f'{safe}.npy')


def format_table(rows):
  keys = [k for k in ('fd_digits', 'class_accuracy', 'swd', 'log_density')
          if any(k in r for r in rows)]
  head = '| sampler | NFE | ' + ' | '.join(keys) + ' |'
  lines = [head, '|' + '---|' * (2 + len(keys))]
  for r in rows:
    vals = [f'{r[k]:.4g}' if k in r else '-' for k in keys]
    lines.append(f'| {r["name"]} | {r["nfe"]} | ' + ' | '.join(vals) + ' |')
  return '\n'.join(lines)


def side_by_side(path, grids, num_classes):
  """One panel per sampler, same noise and labels in every panel."""
  fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.6),
                           dpi=100)
  for ax, (name, samples) in zip(np.atleast_1d(axes), grids.items()):
    if samples.ndim == 2:
      ax.scatter(samples[:, 0], samples[:, 1], s=2)
      ax.set_aspect('equal')
    else:
      cols = num_classes if len(samples) % max(num_classes, 1) == 0 else 10
      ax.imshow(images.grid(images.to_uint8(samples), cols, min_side=0),
                cmap='gray', interpolation='nearest')
    ax.set_title(name, fontsize=9)
    ax.axis('off')
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  plt.close(fig)


def run(config, workdir):
  """Runs `config.pipeline`'s stages in turn, then the comparison."""
  student = None
  for stage in config.pipeline:
    c = stage_config(config, stage, os.path.join(workdir, 'teacher'))
    logging.info('=== Stage %s in %s ===', stage, stage_dir(workdir, c))
    train.train_and_evaluate(c, stage_dir(workdir, c))
    if stage != 'teacher':
      student = c
  if student is not None:
    return compare(config, workdir, student)
  return None
