"""Quality against student steps: CD, CT and progressive distillation for
S in {1, 2, 4, 8, 16} from one teacher, the small-scale counterpart of the
paper's Tables 1 and 3.

  python -m multistep_cm.sweep --config=configs/digits.py --workdir=/tmp/digits

Reuses (or trains) WORKDIR/teacher, trains each student in
WORKDIR/sweep/<stage>_s<S> with the config its single-stage command would
use (PD as a chain of halvings: S = 16 from the teacher sampled with 32 aDDIM
steps, 8 from 16, ..., 1 from 2), and writes WORKDIR/sweep.md and
WORKDIR/sweep.png. Every run resumes after a crash and finished ones are
skipped, so rerunning the command only does what is missing.
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
flags.mark_flag_as_required('workdir')
FLAGS = flags.FLAGS


def _config(configs, stage, steps, teacher_dir, train_steps=None):
  changes = {'teacher_checkpoint': str(teacher_dir)}
  if train_steps:
    changes.update({'total_steps': train_steps, 'eval_every': train_steps,
                    # Spec A14: N anneals over the first half of training.
                    'consistency.anneal_steps': max(1, train_steps // 2)})
  return configs(stage, steps, changes)


def sweep(configs, workdir, steps, stage_names, train_steps=None):
  """Trains and scores every (stage, S) of the plan; returns the scores by
  run key ('<stage>_s<S>'), also stored in WORKDIR/sweep.json."""
  workdir = epath.Path(workdir)
  teacher = configs('teacher')
  teacher_dir = workdir / stages.get('teacher').run_key(teacher)
  train.train_and_evaluate(teacher, teacher_dir)
  results_path = workdir / 'sweep.json'
  results = (json.loads(results_path.read_text()) if results_path.exists()
             else {})
  root = workdir / 'sweep'
  plan = []  # (stage, S, config)
  for name in stage_names:
    stage = stages.get(name)
    if not stage.chains:
      plan += [(stage, s, _config(configs, name, s, teacher_dir, train_steps))
               for s in steps]
      continue
    # Each phase of a chaining stage (PD) halves the steps of the one
    # before; the first halves the teacher's 2 S_max aDDIM steps.
    prev = teacher_dir
    for s in sorted(steps, reverse=True):
      c = _config(configs, name, s, prev, train_steps)
      plan.append((stage, s, c))
      prev = root / stage.run_key(c)
  for stage, s, c in plan:
    key = stage.run_key(c)
    if key in results:
      continue
    directory = root / key
    logging.info('=== %s, S = %d, in %s ===', stage.name.upper(), s,
                 directory)
    run = run_lib.resolve(c)
    train.train_and_evaluate(run, directory)
    scores = quick.from_checkpoint(run, directory, quick.SEED_TABLES)[2]
    results[key] = {'stage': stage.name, 'steps': s, **scores}
    if jax.process_index() == 0:
      results_path.write_text(json.dumps(results, indent=1))
  return results


def main(argv):
  del argv
  configs = config_lib.StageConfigs.from_flag(FLAGS['config'])
  steps = [int(s) for s in FLAGS.steps]
  results = sweep(configs, FLAGS.workdir, steps, FLAGS.stages,
                  FLAGS.train_steps)
  scorer = scoring.get(run_lib.resolve(configs.base), quick=True)
  if jax.process_index() == 0:
    reports.sweep_report(results, FLAGS.workdir, steps, FLAGS.stages, scorer,
                         scorer.floor())


if __name__ == '__main__':
  app.run(main)
