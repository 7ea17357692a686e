"""benchmarks/device_check.sh without an accelerator: its table, its time
budget and its start-up checks, with a stand-in Python that answers as
benchmarks/mfu.py would."""

import os
import pathlib
import shutil
import stat
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / 'benchmarks' / 'device_check.sh'

# Stand-in python3: the import checks succeed unless $FAKE_NO_MLC is set;
# mfu.py prints two measured rows named after its flags, then exits with
# $FAKE_EXIT.
FAKE_PYTHON = r'''#!/bin/bash
if [ "$1" = -c ]; then
  case "$2" in
    *ml_collections*) [ -z "${FAKE_NO_MLC:-}" ]; exit ;;
    *) echo '1 x Fake chip, jax 0'; exit 0 ;;
  esac
fi
echo "$*" >> "$FAKE_DIR/calls"
echo 'I0000 compile log line'
echo "measured: | teacher train step | 1.0 | 2.0 | 3 | 4 | 5 % | 6.0 | 0.1 | - |"
echo "measured: | XLA_FLAGS=${XLA_FLAGS} | 1.0 | 2.0 | 3 | 4 | 5 % | 6.0 | 0.1 | - |"
exit "${FAKE_EXIT:-0}"
'''


def _run(tmp_path, **env):
  fake = tmp_path / 'python3'
  fake.write_text(FAKE_PYTHON)
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  out = tmp_path / 'out'
  env = {'PATH': os.environ['PATH'], 'PYTHON': str(fake),
         'FAKE_DIR': str(tmp_path), **env}
  result = subprocess.run(['bash', str(SCRIPT), str(out)], env=env,
                          capture_output=True, text=True, check=False)
  calls = tmp_path / 'calls'
  return result, out, calls.read_text().splitlines() if calls.exists() else []


def test_every_run_fits_a_large_budget(tmp_path):
  result, out, calls = _run(tmp_path)
  assert result.returncode == 0, result.stderr
  table = (out / 'device_check.md').read_text()
  assert '1 x Fake chip' in table
  rows = [line for line in table.splitlines() if line.startswith('| ')]
  # The header, then two rows per run, each under its run's label.
  assert rows[0].startswith('| run | program |')
  assert '| scan, batch 128 | teacher train step |' in table
  assert '| no Triton GEMM, batch 128 | XLA_FLAGS=--xla_gpu_enable_triton_gemm=false |' in table
  assert len(calls) == 6 and len(rows) == 1 + 2 * len(calls)
  assert all('--config=configs/imagenet64.py:small' in c for c in calls)
  assert '--config.model.remat=dots_saveable' in calls[1]
  assert '--per_device_batch=256' in calls[1]
  assert 'compile log line' in (out / 'device_check.log').read_text()
  assert 'compile log line' not in table


def test_runs_that_do_not_fit_are_skipped_and_failures_noted(tmp_path):
  result, out, calls = _run(tmp_path, DEVICE_CHECK_SECONDS='100', FAKE_EXIT='3',
                            DEVICE_CHECK_CONFIG='configs/digits.py:smoke')
  assert result.returncode == 0, result.stderr
  table = (out / 'device_check.md').read_text()
  # 200 s for the main table and 150 s for the unscanned run do not fit 100.
  assert '| scan, batch 128 | skipped: ' in table
  assert '| unscanned, batch 128 | skipped: ' in table
  assert '| remat dots_saveable, batch 256 | stopped: exit 3' in table
  assert len(calls) == 4
  assert all('--config=configs/digits.py:smoke' in c for c in calls)


def test_missing_ml_collections_is_one_line(tmp_path):
  result, out, calls = _run(tmp_path, FAKE_NO_MLC='1')
  assert result.returncode == 2
  assert result.stderr.strip().count('\n') == 0
  assert 'ml_collections' in result.stderr and calls == []
  assert not out.exists()


@pytest.mark.skipif(shutil.which('shellcheck') is None,
                    reason='shellcheck is not installed')
def test_shellcheck():
  result = subprocess.run(['shellcheck', '-s', 'bash', str(SCRIPT)],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout
