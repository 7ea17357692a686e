"""Tests run on 8 fake CPU devices: the flag must be set before jax starts.

Compiled programs are shared through jax's persistent compilation cache, in
one directory per test session (its workers and the processes its tests
start): many tests compile the same small programs. A cached program is
keyed by its HLO, the compile options and the jax version, so a hit runs
exactly what a compile would have produced.
"""

import atexit
import os
import shutil
import sys
import tempfile

# XLA's CPU fusion emitters compile the suite's programs about a third slower
# than the classic ones.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8'
                           ' --xla_cpu_use_fusion_emitters=false')
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  # The controller's directory, inherited by the xdist workers it starts.
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(
      prefix='multistep_cm_test_jit_cache_')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'],
                  True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

# Tiny models: compile time dominates, and optimisations barely pay back.
# The environment variable carries the setting to the processes tests start.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', 'true')
jax.config.update('jax_disable_most_optimizations', True)


import contextlib  # pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

# gs:// on a GCS emulator on loopback: the fixtures gcs_server, gcs_bucket
# (in-process) and gcs_env (for the processes tests start).
pytest_plugins = ['tests.gcs']


@pytest.fixture
def count_compiles():
  """A context manager collecting every XLA compilation that happens in it,
  and every program taken from the persistent cache instead."""
  @contextlib.contextmanager
  def counting():
    events = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _, **kw: events.append(event)
        if 'backend_compile' in event else None)
    jax.monitoring.register_event_listener(
        lambda event, **kw: events.append(event)
        if 'cache_hits' in event else None)
    try:
      yield events
    finally:
      jax.monitoring.clear_event_listeners()
  return counting


@pytest.fixture
def fresh_train_step():
  """`config -> (mesh, initial state, jitted train step)`, built as the train
  loop builds them."""
  from multistep_cm import run as run_lib  # pylint: disable=g-import-not-at-top
  from multistep_cm import train  # pylint: disable=g-import-not-at-top
  from multistep_cm.core import state as state_lib  # pylint: disable=g-import-not-at-top

  def build(config):
    run = run_lib.resolve(config)
    tx = state_lib.make_optimizer(config.optim)
    state, shardings = state_lib.init_state(run, tx)
    return run.mesh, state, train.make_train_step(run, tx, shardings)
  return build


@pytest.fixture(scope='session')
def digits_teacher(tmp_path_factory):
  """(config, workdir) of a digits smoke teacher trained once for the whole
  session; tests that write into the workdir copy it first."""
  from configs import digits  # pylint: disable=g-import-not-at-top
  from multistep_cm import train  # pylint: disable=g-import-not-at-top
  config = digits.get_config('smoke')
  workdir = str(tmp_path_factory.mktemp('digits_teacher'))
  train.train_and_evaluate(config, workdir)
  return config, workdir


@pytest.fixture
def eigen_frechet(monkeypatch):
  """Frechet distances of 2048-d Inception statistics by eigenvalues instead
  of scipy's sqrtm, for tests of the paths around them: the Schur
  decomposition behind sqrtm takes 20-60 s per call on the 2-core CI machine,
  eigenvalues 4 s. `metrics.frechet_distance` itself is checked against this
  formula in test_fid.py."""
  from multistep_cm.evaluation import metrics  # pylint: disable=g-import-not-at-top
  from tests import frechet  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(metrics, 'frechet_distance', frechet.independent_fd)


# Modules with tests of a minute or more (on the 2-core CI machine), and
# test_readme, whose tests run as one group of over a minute on one worker.
# They start first: collected last, they would keep one worker busy long
# after the other has run out of tests.
SLOW_MODULES = ('test_imported_teacher.py', 'test_toy2d_distillation.py',
                'test_text2image.py', 'test_readme.py', 'test_evaluation.py',
                'test_pipeline.py', 'test_multihost.py')


def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: (
      SLOW_MODULES.index(item.path.name) if item.path.name in SLOW_MODULES
      else len(SLOW_MODULES)))
