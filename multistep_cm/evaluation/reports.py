"""Reports over several checkpoints: the pipeline's comparison of a student
with its teacher's samplers, and the sweep's quality-against-steps table and
plot. Metric names come from the dataset's scorer; files go through
etils.epath, so a gs:// workdir works as a local one."""

import io
import json

from absl import logging
from etils import epath
import jax
import matplotlib
import numpy as np

from multistep_cm import run as run_lib
from multistep_cm.core import images
from multistep_cm.evaluation import quick
from multistep_cm.evaluation import scoring

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

# Which of the teacher's samplers the comparison shows is this report's
# choice, not a fact of a sampler; its rows are named by kind, not label,
# because a rerun finds the rows it stored by their names.
TEACHER_KINDS = ('addim', 'ddim')


def compare(teacher_config, teacher_dir, student, student_dir, workdir):
  """The table: the student (its config and workdir) with its S steps (an
  any-S student with each S it learned, and its config.student_steps)
  against the teacher's aDDIM and DDIM at `pipeline.teacher_steps`, plus the
  floor; WORKDIR/comparison.{md,png}.
  Each row is stored once computed (comparison.json and its grid), so a
  rerun computes only the missing ones. The configs may be given resolved
  (`run.Run`). Returns the rows."""
  teacher, student = run_lib.of(teacher_config), run_lib.of(student)
  cfg = student.config
  runs = [(f'student ({cfg.stage.upper()}, S={cfg.student_steps})',
           student, student_dir, student.stage.sampler(cfg))]
  if student.any_steps:  # One student, a row for each S.
    runs = [(f'student ({cfg.stage.upper()} any-S, S={s}' +
             ('' if s in student.any_steps else ', not trained') + ')',
             student, student_dir, student.stage.sampler(cfg, steps=s))
            for s in sorted({*student.any_steps, cfg.student_steps})]
  students = len(runs)
  cfg = teacher.config
  for steps in cfg.pipeline.teacher_steps:
    for kind in TEACHER_KINDS:
      runs.append((f'teacher {kind} {steps}', teacher, teacher_dir,
                   teacher.stage.sampler(cfg, kind, steps)))
  # An any-S student's panels in a row of their own, the teacher's below.
  return table(runs, workdir, 'comparison',
               per_row=students if students > 1 else None)


def table(runs, workdir, stem, per_row=None, notes=''):
  """The rows of `runs`, (name, config, workdir, SamplerSpec) each scored by
  the quick evaluation of that workdir's newest checkpoint with the same
  seeds, plus the floor (each config resolved once; or given resolved, as
  a `run.Run`): WORKDIR/STEM.md, and STEM.png with their grids side
  by side. Each row is stored once computed (STEM.json and its grid), so a
  rerun computes only the missing ones. `per_row`: panels to a row of the
  PNG; `notes`: markdown written under the table. Returns the rows."""
  workdir = epath.Path(workdir)
  path = workdir / f'{stem}.json'
  rows = json.loads(path.read_text()) if path.exists() else []
  resolved = {}
  for _, cfg, _, _ in runs:
    if id(cfg) not in resolved:
      resolved[id(cfg)] = run_lib.of(cfg)
  runs = [(name, resolved[id(cfg)], directory, spec)
          for name, cfg, directory, spec in runs]
  first = runs[0][1]
  scorer = scoring.get(first, quick=True)
  grids = {}
  for name, run, directory, spec in runs:
    grid_path = _grid_path(workdir, stem, name)
    if name in {r['name'] for r in rows} and grid_path.exists():
      grids[name] = _load_grid(grid_path)
      continue
    _, samples, scores, _ = quick.from_checkpoint(run, directory,
                                                  quick.SEED_TABLES, spec)
    row = {'name': name, 'sampler': spec.kind, 'steps': spec.steps,
           'nfe': spec.nfe(run.condition), **scores}
    rows = [r for r in rows if r['name'] != name] + [row]
    grids[name] = samples[:run.config.train_eval.grid_size]
    if jax.process_index() == 0:
      _save_grid(grid_path, grids[name])
      path.write_text(json.dumps(rows, indent=1))
    logging.info('%s: %s', name, scores)
  floor = {'name': scorer.floor_label, 'sampler': '-', 'steps': '-',
           'nfe': '-', **scorer.floor()}
  order = [r for name, *_ in runs for r in rows if r['name'] == name]
  text = format_table(order + [floor], scorer.metrics)
  if jax.process_index() == 0:
    (workdir / f'{stem}.md').write_text(text + '\n' + notes)
    side_by_side(workdir / f'{stem}.png', grids,
                 first.dataset.grid_columns, per_row)
  print('\n' + text + '\n', flush=True)
  return order


def _grid_path(workdir, stem, name):
  safe = ''.join(c if c.isalnum() else '_' for c in name)
  # The pipeline's comparison keeps its grids where it always did.
  folder = 'grids' if stem == 'comparison' else f'grids_{stem}'
  return workdir / folder / f'{safe}.npy'


def _save_grid(path, samples):
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('wb') as f:
    np.save(f, samples)


def _load_grid(path):
  return np.load(io.BytesIO(path.read_bytes()))


def format_table(rows, metrics):
  """A markdown table: sampler, NFE, and each metric some row has."""
  metrics = [m for m in metrics if any(m.key in r for r in rows)]
  lines = ['| sampler | NFE | ' + ' | '.join(m.heading for m in metrics) + ' |',
           '|' + '---|' * (2 + len(metrics))]
  for r in rows:
    vals = [f'{r[m.key]:.4g}' if m.key in r else '-' for m in metrics]
    lines.append(f'| {r["name"]} | {r["nfe"]} | ' + ' | '.join(vals) + ' |')
  return '\n'.join(lines)


def _save_figure(fig, path):
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('wb') as f:
    fig.savefig(f, format='png')
  plt.close(fig)


def side_by_side(path, grids, columns, per_row=None):
  """One panel per sampler, same noise and labels in every panel, grids of
  `columns` columns (when they divide the samples; else 10); `per_row`
  panels to a row (default: all in one)."""
  cols = per_row or len(grids)
  rows = -(-len(grids) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows),
                           dpi=100, squeeze=False)
  for ax in axes.flat[len(grids):]:
    ax.axis('off')
  for ax, (name, samples) in zip(axes.flat, grids.items()):
    if samples.ndim == 2:
      ax.scatter(samples[:, 0], samples[:, 1], s=2)
      ax.set_aspect('equal')
    else:
      cols = columns if len(samples) % max(columns, 1) == 0 else 10
      ax.imshow(images.grid(images.to_uint8(samples), cols, min_side=0),
                cmap='gray', interpolation='nearest')
    ax.set_title(name, fontsize=9)
    ax.axis('off')
  fig.tight_layout()
  _save_figure(fig, path)


def _spread(values):
  """'mean' of one value, 'mean ±half-range' of several."""
  if len(values) == 1:
    return f'{values[0]:.4g}'
  return f'{np.mean(values):.4g} ±{(max(values) - min(values)) / 2:.2g}'


def sweep_report(rows, workdir, steps, scorer, floor):
  """WORKDIR/sweep.md (one table per metric: a row per student, a column per
  S) and WORKDIR/sweep.png (each metric against S, the floor dashed), from
  `rows`: (label, {S: its scores, one dict per noise seed}). A cell of
  several seeds is their mean ± half their range; an S outside `steps` (an
  any-S student's untrained S) is marked * and drawn hollow."""
  columns = sorted({s for _, by_s in rows for s in by_s})
  metrics = [m for m in scorer.metrics
             if any(m.key in r for _, by_s in rows for rs in by_s.values()
                    for r in rs)]
  values = lambda rs, key: [r[key] for r in rs if key in r]  # noqa: E731
  lines = []
  for m in metrics:
    lines.append(f'| {m.heading} | ' + ' | '.join(
        f'S={s}' + ('' if s in steps else '*') for s in columns) + ' |')
    lines.append('|---|' + '---|' * len(columns))
    for label, by_s in rows:
      cells = [values(by_s.get(s, []), m.key) for s in columns]
      lines.append(f'| {label} | ' + ' | '.join(
          _spread(v) if v else '-' for v in cells) + ' |')
    lines.append('')
  if any(s not in steps for s in columns):
    lines.append('*: not among the step counts trained.')
  table = '\n'.join(lines)
  workdir = epath.Path(workdir)
  (workdir / 'sweep.md').write_text(table)
  print('\n' + table, flush=True)

  fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8),
                           dpi=100)
  for ax, m in zip(np.atleast_1d(axes), metrics):
    for label, by_s in rows:
      pts = [(s, v) for s in columns if (v := values(by_s.get(s, []), m.key))]
      if not pts:
        continue
      x = np.array([s for s, _ in pts])
      mean = np.array([np.mean(v) for _, v in pts])
      err = np.array([[np.mean(v) - min(v) for _, v in pts],
                      [max(v) - np.mean(v) for _, v in pts]])
      ax.errorbar(x, mean, yerr=err, marker='o', capsize=3, label=label)
      hollow = np.array([s not in steps for s in x])
      if hollow.any():  # White centres: the untrained S.
        ax.plot(x[hollow], mean[hollow], 'o', color='white', ms=4, zorder=3)
    if m.key in floor:
      ax.axhline(floor[m.key], color='gray', ls='--', label=scorer.floor_label)
    ax.set(xscale='log', xlabel='student steps S', ylabel=m.heading,
           yscale='log' if m.log_scale else 'linear')
    ax.set_xticks(columns, [str(s) for s in columns])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    if m.log_scale:  # Values within a decade: label the minor ticks too.
      ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter('%g'))
      ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter('%g'))
    ax.legend(fontsize=8)
  fig.tight_layout()
  _save_figure(fig, workdir / 'sweep.png')
