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
from multistep_cm.evaluation import reports


def run(configs, workdir):
  """Trains `configs.base.pipeline.stages` in turn (a `StageConfigs`: the
  config of each stage), students from the teacher trained first, then
  writes the comparison. Returns its rows, or None without a student."""
  workdir = epath.Path(workdir)
  teacher = student = None
  for name in configs.base.pipeline.stages:
    stage = stages.get(name)
    changes = ({'teacher_checkpoint': str(teacher[1])} if stage.student
               else {})
    config = configs(name, changes=changes)
    directory = workdir / stage.workdir_name(config)
    logging.info('=== Stage %s in %s ===', name, directory)
    train.train_and_evaluate(config, directory)
    if stage.student:
      student = (config, directory)
    else:
      teacher = (config, directory)
  if student is None:
    return None
  return reports.compare(*teacher, *student, workdir)
