"""The embedded default end to end, and the S-sweep, on smoke configs."""

import json
import os
import shutil

import numpy as np
from PIL import Image

from configs import digits
from configs import toy2d
from multistep_cm import pipeline
from multistep_cm import run as run_lib
from multistep_cm import sweep
from multistep_cm.core import config as common
from multistep_cm.evaluation import reports
from multistep_cm.evaluation import scoring


def test_digits_pipeline_and_resume(tmp_path, capsys):
  config = common.StageConfigs(digits.get_config, 'smoke')
  rows = pipeline.run(config, str(tmp_path))
  names = [r['name'] for r in rows]
  assert names == ['student (CD, S=8)', 'teacher addim 2', 'teacher ddim 2',
                   'teacher addim 4', 'teacher ddim 4']
  assert [r['nfe'] for r in rows] == [8, 2, 2, 4, 4]
  assert all(np.isfinite(r['fd_digits']) for r in rows)
  table = capsys.readouterr().out
  assert '| student (CD, S=8) | 8 |' in table and 'real held-out digits' in table
  assert os.path.isdir(tmp_path / 'teacher' / 'checkpoints' / '4')
  assert os.path.isdir(tmp_path / 'cd_s8' / 'checkpoints' / '2')
  w, h = Image.open(tmp_path / 'comparison.png').size
  assert w > 4 * h  # Five panels side by side.

  # A rerun finds every stage finished and every row computed: same table.
  mtime = os.path.getmtime(tmp_path / 'comparison.json')
  again = pipeline.run(config, str(tmp_path))
  assert again == rows
  assert os.path.getmtime(tmp_path / 'comparison.json') == mtime


def test_toy2d_pipeline(tmp_path):
  rows = pipeline.run(common.StageConfigs(toy2d.get_config, 'smoke'),
                      str(tmp_path))
  assert rows[0]['name'] == 'student (CD, S=8)'
  assert all(np.isfinite(r['swd']) for r in rows)


def test_sweep(tmp_path, digits_teacher):
  # The session's smoke teacher is the one the sweep would train first.
  shutil.copytree(digits_teacher[1], tmp_path / 'teacher')
  config = common.StageConfigs(digits.get_config, 'smoke')
  # A stage that starts every S from the teacher, and the chaining one (CT
  # plans as CD does; its training: test_students.py); an any-S CD student
  # for both S, also scored at an S it was not trained for; two seeds.
  steps, stages = [1, 2], ['cd', 'pd']
  results = sweep.sweep(config, str(tmp_path), steps, stages, train_steps=2,
                        any_train_steps=[2], untrained_steps=[3], seeds=2)
  assert sorted(results) == sorted(
      [f'{m}_s{s}' for m in stages for s in steps] +
      [f'cd_any_t2_s{s}' for s in (1, 2, 3)])
  # The PD chain: S = 2 from the teacher, S = 1 from the S = 2 student.
  with open(tmp_path / 'sweep' / 'pd_s1' / 'config.json') as f:
    assert json.load(f)['teacher_checkpoint'].endswith('sweep/pd_s2')
  with open(tmp_path / 'sweep' / 'pd_s2' / 'config.json') as f:
    assert json.load(f)['teacher_checkpoint'].endswith('/teacher')
  # One any-S student, trained once for both S, sampled with each S.
  assert sorted(os.listdir(tmp_path / 'sweep')) == [
      'cd_any_t2', 'cd_s1', 'cd_s2', 'pd_s1', 'pd_s2']
  with open(tmp_path / 'sweep' / 'cd_any_t2' / 'config.json') as f:
    assert json.load(f)['any_steps'] == [1, 2]
  for key in ('cd_s1', 'cd_any_t2_s1', 'cd_any_t2_s3'):
    first, second = results[key]['by_seed']  # Two noise seeds, two scores.
    assert first['fd_digits'] != second['fd_digits']
  rows = sweep.report_rows(results, steps, stages)
  assert [label for label, _ in rows] == ['CD', 'CD any-S, 2 steps', 'PD']
  reports.sweep_report(rows, str(tmp_path), steps,
                       scoring.get(run_lib.resolve(config.base), quick=True),
                       {'fd_digits': 4.5})
  assert (tmp_path / 'sweep.png').exists()
  table = (tmp_path / 'sweep.md').read_text()
  assert '| CD |' in table and '| S=1 | S=2 | S=3* |' in table
  assert '| CD any-S, 2 steps | ' in table and ' ±' in table
  # A rerun finds every student trained and scored.
  assert sweep.sweep(config, str(tmp_path), steps, stages, train_steps=2,
                     any_train_steps=[2], untrained_steps=[3],
                     seeds=2) == results
