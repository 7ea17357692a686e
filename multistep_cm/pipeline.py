"""The embedded default, end to end: train the teacher, distil a student,
compare the student with the teacher's samplers.

Each stage runs in its own sub-directory of the workdir (its stage's
`run_key`) with the config its single-stage command would use, and
resumes there after a crash; each row of the comparison is stored once
computed, so a restarted comparison only computes what is missing.
"""

from absl import logging
from etils import epath

from multistep_cm import run as run_lib
from multistep_cm import train
from multistep_cm.core import stages
from multistep_cm.core import validation
from multistep_cm.evaluation import reports


def run(configs, workdir):
  """Trains `configs.base.pipeline.stages` in turn (a `StageConfigs`: the
  config of each stage), students from the teacher trained first, then
  writes the comparison. Returns its rows, or None without a student.
  With `pipeline.guidance`, runs `run_guided` instead."""
  if configs.base.pipeline.guidance:
    return run_guided(configs, workdir)
  workdir = epath.Path(workdir)
  runs, teacher_dir = [], None
  for name in configs.base.pipeline.stages:
    stage = stages.get(name)
    changes = ({'teacher_checkpoint': str(teacher_dir)} if stage.distilled
               else {})
    config = configs(name, changes=changes)
    directory = workdir / stage.run_key(config)
    if not stage.distilled:
      teacher_dir = directory
    runs.append((stage, config, directory))
  # Every stage's config is resolved and checked before the first one
  # starts.
  runs = [(stage, run_lib.resolve(config), directory)
          for stage, config, directory in runs]
  for _, run, _ in runs:
    validation.check_config(run)
  validation.check_workdir(workdir)
  teacher = student = None
  for stage, run, directory in runs:
    logging.info('=== Stage %s in %s ===', stage.name, directory)
    train.train_and_evaluate(run, directory)
    if stage.distilled:
      student = (run, directory)
    else:
      teacher = (run, directory)
  if student is None:
    return None
  return reports.compare(*teacher, *student, workdir)


def run_guided(configs, workdir):
  """The paper's Table 6 on the config's data: the teacher (WORKDIR/teacher),
  then for each guidance scale w of `pipeline.guidance`, in WORKDIR/w<w>/,
  the stages of `pipeline.guided_stages` (by default a guidance-distilled
  teacher, gd_w<w>, and CD students at each S of `pipeline.student_steps`,
  cd_s<S>), all from the teacher guided at w (one student per scale); then
  the table (WORKDIR/guided.{md,json,png}) of each against the teacher's
  guided aDDIM and ancestral DDPM at `pipeline.teacher_steps[-1]` steps.
  Returns its rows."""
  workdir = epath.Path(workdir)
  base = configs.base.pipeline
  teacher = configs('teacher')
  teacher_stage = stages.get('teacher')
  teacher_dir = workdir / teacher_stage.run_key(teacher)
  runs = [(teacher_stage, teacher, teacher_dir)]
  for w in base.guidance:
    changes = {'teacher_checkpoint': str(teacher_dir),
               'consistency.guidance': float(w)}
    for name in base.guided_stages:
      stage = stages.get(name)
      for steps in (base.student_steps if stage.sampling == 'student'
                    else (None,)):
        config = configs(name, steps, changes)
        runs.append((stage, config,
                     workdir / f'w{w:g}' / stage.run_key(config)))
  runs = [(stage, run_lib.resolve(config), directory)
          for stage, config, directory in runs]
  for _, run, _ in runs:
    validation.check_config(run)
  validation.check_workdir(workdir)
  for stage, run, directory in runs:
    logging.info('=== Stage %s in %s ===', stage.name, directory)
    train.train_and_evaluate(run, directory)

  rows = []
  teacher_steps = base.teacher_steps[-1]
  teacher_run = runs[0][1]
  for w in base.guidance:
    for kind in ('addim', 'ddpm'):
      spec = teacher_stage.sampler(teacher, kind, teacher_steps, float(w))
      rows.append((f'w={w:g}: teacher {spec.label}', teacher_run, teacher_dir,
                   spec))
    for stage, run, directory in runs[1:]:
      config = run.config
      if config.consistency.guidance == float(w):
        rows.append((f'w={w:g}: {stage.label(config)}', run, directory,
                     stage.sampler(config)))
  return reports.table(rows, workdir, 'guided',
                       per_row=len(rows) // len(base.guidance),
                       notes=teacher_run.dataset.notes(
                           teacher.train_eval.grid_size))
