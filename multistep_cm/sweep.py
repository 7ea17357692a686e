"""Quality against student steps: CD, CT and progressive distillation for
S in {1, 2, 4, 8, 16} from one teacher, the small-scale counterpart of the
paper's Tables 1 and 3.

  python -m multistep_cm.sweep --config=configs/digits.py --workdir=/tmp/digits

Reuses (or trains) WORKDIR/teacher, trains each student in
WORKDIR/sweep/<stage>_s<S> with the config its single-stage command would
use (PD as a chain of halvings: S = 16 from the teacher sampled with 32 aDDIM
steps, 8 from 16, ..., 1 from 2), and writes WORKDIR/sweep.md and
WORKDIR/sweep.png. With --any_train_steps, also one any-S student of CD
(and of CT) for all the S at once, per training length listed, in
WORKDIR/sweep/<stage>_any_t<length>, scored at every S of --steps and of
--untrained_steps; --seeds scores every student with several noise seeds
(the tables then give mean ± half-range), and
--config.any_steps_weights=... trains any-S students with those draw
weights beside the uniform ones. Every run resumes after a crash
and finished ones are skipped, so rerunning the command only does what is
missing (more seeds only score again).
"""

import json

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
from ml_collections import config_flags

from multistep_cm import run as run_lib
from multistep_cm import train
from multistep_cm.core import config as config_lib
from multistep_cm.core import stages
from multistep_cm.evaluation import quick
from multistep_cm.evaluation import reports
from multistep_cm.evaluation import scoring

config_flags.DEFINE_config_file('config', 'configs/digits.py', 'Config file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory shared with the main command.')
flags.DEFINE_list('steps', ['1', '2', '4', '8', '16'], 'Student steps S.')
flags.DEFINE_list('stages', ['cd', 'ct', 'pd'], 'Methods to sweep.')
flags.DEFINE_integer('train_steps', None, 'Training steps of each student '
                     '(and of each PD phase); default: the config\'s.')
flags.DEFINE_list('any_train_steps', [], 'Also one any-S student of each '
                  'swept stage that has them (cd, ct) for all of --steps, '
                  'per training length listed here.')
flags.DEFINE_list('untrained_steps', ['3', '6', '12'], 'Step counts the any-S '
                  'students are also scored at, untrained.')
flags.DEFINE_integer('seeds', 1, 'Noise seeds each student is scored with: '
                     'the tables give their mean and spread.')
flags.mark_flag_as_required('workdir')
FLAGS = flags.FLAGS


def _config(configs, stage, steps, teacher_dir, train_steps=None,
            any_steps=()):
  changes = {'teacher_checkpoint': str(teacher_dir)}
  if train_steps:
    changes.update({'total_steps': train_steps, 'eval_every': train_steps,
                    # Spec A14: N anneals over the first half of training.
                    'consistency.anneal_steps': max(1, train_steps // 2)})
  if any_steps:
    changes['any_steps'] = tuple(any_steps)
  return configs(stage, steps, changes)


def any_key(stage, train_steps, steps=None, weights=()):
  """The run key of an any-S student trained for `train_steps` drawing its
  S with `weights` (config.any_steps_weights), and of its scores at S =
  `steps`."""
  drawn = '_w' + '-'.join(f'{w:g}' for w in weights) if weights else ''
  key = f'{stage.key(any_steps=True)}{drawn}_t{train_steps}'
  return key if steps is None else f'{key}_s{steps}'


def _scores_by_seed(entry):
  """An entry's scores, one dict per noise seed (an entry of one seed keeps
  them beside its stage and steps)."""
  if not entry:
    return []
  return entry.get('by_seed') or [
      {k: v for k, v in entry.items() if k not in ('stage', 'steps')}]


def sweep(configs, workdir, steps, stage_names, train_steps=None,
          any_train_steps=(), untrained_steps=(), seeds=1):
  """Trains and scores every (stage, S) of the plan, and every any-S student
  (one per stage with them and per length of `any_train_steps`, for all of
  `steps`, scored also at `untrained_steps`), each with `seeds` noise
  seeds; returns the scores by run key ('<stage>_s<S>',
  '<stage>_any_t<length>_s<S>'), also stored in WORKDIR/sweep.json."""
  workdir = epath.Path(workdir)
  teacher = configs('teacher')
  teacher_dir = workdir / stages.get('teacher').run_key(teacher)
  train.train_and_evaluate(teacher, teacher_dir)
  results_path = workdir / 'sweep.json'
  results = (json.loads(results_path.read_text()) if results_path.exists()
             else {})
  root = workdir / 'sweep'
  weights = tuple(configs.base.get('any_steps_weights', ()))
  plan = []  # (stage, S, config to train, directory, run key)
  for name in stage_names:
    stage = stages.get(name)
    if not stage.chains:
      for s in steps:
        c = _config(configs, name, s, teacher_dir, train_steps)
        plan.append((stage, s, c, root / stage.run_key(c), stage.run_key(c)))
    else:
      # Each phase of a chaining stage (PD) halves the steps of the one
      # before; the first halves the teacher's 2 S_max aDDIM steps.
      prev = teacher_dir
      for s in sorted(steps, reverse=True):
        c = _config(configs, name, s, prev, train_steps)
        prev = root / stage.run_key(c)
        plan.append((stage, s, c, prev, stage.run_key(c)))
    if not stage.any_steps:
      continue
    for length in any_train_steps:
      # One student for every S: trained once, sampled with each S.
      directory = root / any_key(stage, length, weights=weights)
      for s in sorted(set(steps) | set(untrained_steps)):
        c = _config(configs, name, s, teacher_dir, length, steps)
        plan.append((stage, s, c, directory,
                     any_key(stage, length, s, weights)))
  trained = set()  # An any-S student's directory is trained once.
  for stage, s, c, directory, key in plan:
    by_seed = _scores_by_seed(results.get(key))
    if len(by_seed) >= seeds:
      continue
    run = run_lib.resolve(c)
    if directory not in trained:
      logging.info('=== %s, S = %d, in %s ===', stage.name.upper(), s,
                   directory)
      train.train_and_evaluate(run, directory)  # Resumes, or is done.
      trained.add(directory)
    for i in range(len(by_seed), seeds):
      by_seed.append(quick.from_checkpoint(run, directory,
                                           quick.table_seed(i))[2])
    results[key] = {'stage': stage.name, 'steps': s,
                    'any_steps': list(c.any_steps),
                    'any_steps_weights': list(c.any_steps_weights),
                    'train_steps': c.total_steps, 'by_seed': by_seed}
    if jax.process_index() == 0:
      results_path.write_text(json.dumps(results, indent=1))
  return results


def report_rows(results, steps, stage_names):
  """The rows of `reports.sweep_report`: per stage its students of one S
  (at `steps`), then every any-S student of that stage in `results` (by
  draw weights, then training length), each (label, {S: scores per
  seed})."""
  rows = []
  for name in stage_names:
    stage = stages.get(name)
    rows.append((name.upper(), {s: _scores_by_seed(results.get(
        stage.key(steps=s))) for s in steps}))
    students = {}
    for entry in results.values():
      if entry['stage'] == name and entry.get('any_steps'):
        student = (tuple(entry.get('any_steps_weights', ())),
                   entry['train_steps'])
        students.setdefault(student, {})[entry['steps']] = _scores_by_seed(
            entry)
    for (weights, length), by_s in sorted(students.items()):
      drawn = (', S drawn ' + ':'.join(f'{w:g}' for w in weights)
               if weights else '')
      rows.append((f'{name.upper()} any-S{drawn}, {length} steps',
                   dict(sorted(by_s.items()))))
  return rows


def main(argv):
  del argv
  configs = config_lib.StageConfigs.from_flag(FLAGS['config'])
  steps = [int(s) for s in FLAGS.steps]
  any_train_steps = [int(s) for s in FLAGS.any_train_steps]
  untrained = [int(s) for s in FLAGS.untrained_steps
               if any_train_steps and int(s) not in steps]
  results = sweep(configs, FLAGS.workdir, steps, FLAGS.stages,
                  FLAGS.train_steps, any_train_steps, untrained, FLAGS.seeds)
  scorer = scoring.get(run_lib.resolve(configs.base), quick=True)
  if jax.process_index() == 0:
    reports.sweep_report(report_rows(results, steps, FLAGS.stages),
                         FLAGS.workdir, steps, scorer, scorer.floor())


if __name__ == '__main__':
  app.run(main)
