"""The embedded default, end to end: train the teacher, distil a student,
compare the student with the teacher's samplers.

Each stage runs in its own sub-directory of the workdir (its stage's
`workdir_name`) with the config its single-stage command would use, and
resumes there after a crash; each row of the comparison is stored once
computed, so a restarted comparison only computes what is missing.
"""

from absl import logging
from etils import epath

from multistep_cm import train
from multistep_cm.core import stages
from multistep_cm.core import validation
from multistep_cm.evaluation import reports


def run(configs, workdir):
  """Trains `configs.base.pipeline.stages` in turn (a `StageConfigs`: the
  config of each stage), students from the teacher trained first, then
  writes the comparison. Returns its rows, or None without a student."""
  workdir = epath.Path(workdir)
  runs, teacher_dir = [], None
  for name in configs.base.pipeline.stages:
    stage = stages.get(name)
    changes = ({'teacher_checkpoint': str(teacher_dir)} if stage.student
               else {})
    config = configs(name, changes=changes)
    directory = workdir / stage.workdir_name(config)
    if not stage.student:
      teacher_dir = directory
    runs.append((stage, config, directory))
  # Every stage's config is checked before the first one starts.
  for _, config, _ in runs:
    validation.check_config(config)
  validation.check_workdir(workdir)
  teacher = student = None
  for stage, config, directory in runs:
    logging.info('=== Stage %s in %s ===', stage.name, directory)
    train.train_and_evaluate(config, directory)
    if stage.student:
      student = (config, directory)
    else:
      teacher = (config, directory)
  if student is None:
    return None
  return reports.compare(*teacher, *student, workdir)
