import glob
import re
import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import digits
from configs import toy2d
from multistep_cm import datasets
from multistep_cm import train
from multistep_cm import errors
from multistep_cm import run as run_lib
from multistep_cm.core import sharding
from multistep_cm.core import state as state_lib
from multistep_cm.evaluation import quick


def _leaves_equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_train_and_evaluate_digits_smoke(tmp_path):
  config = digits.get_config('smoke')
  state, scores = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == config.total_steps
  assert np.isfinite(scores['fd_digits']) and 0 <= scores['class_accuracy'] <= 1
  assert scores['floor_class_accuracy'] > 0.95
  assert os.path.exists(tmp_path / 'samples' / 'step_0000004.png')
  assert glob.glob(str(tmp_path / 'events.out.tfevents.*'))
  assert os.path.isdir(tmp_path / 'checkpoints' / '4')
  # Sampling mode reads the checkpoint back and writes the ADM layout.
  png, npz = quick.write_samples(config, str(tmp_path), 20)
  assert os.path.exists(png)
  with np.load(npz) as f:
    assert f['arr_0'].shape == (20, 8, 8, 1) and f['arr_0'].dtype == np.uint8
    np.testing.assert_array_equal(f['arr_1'], np.arange(20) % 10)


def test_train_toy2d_smoke_with_a_profile(tmp_path):
  config = toy2d.get_config('smoke')
  config.profile_steps = (2, 3)
  state, scores = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 4 and np.isfinite(scores['swd'])
  assert os.path.exists(tmp_path / 'samples' / 'step_0000004.png')
  # One trace, of the window, where TensorBoard's profile plugin looks.
  assert len(glob.glob(str(tmp_path / 'profile' / 'plugins' / 'profile' /
                           '*' / '*.xplane.pb'))) == 1
  config.profile_steps = (3, 9)
  with pytest.raises(errors.ConfigError, match='profile_steps'):
    train.train_and_evaluate(config, str(tmp_path / 'bad'))


def test_resume_is_exact(tmp_path, monkeypatch):
  """4 steps straight == 2 steps, a restart from the checkpoint, 2 more."""
  config = digits.get_config('smoke')
  config.eval_every = 1000  # Evaluation is not what this test is about.
  straight, _ = train.train_and_evaluate(config, str(tmp_path / 'a'))
  config.total_steps = 2
  train.train_and_evaluate(config, str(tmp_path / 'b'))

  starts = []
  cls = type(datasets.get(config))
  real = cls.train_batches

  def recording(self, global_batch, seed, start_step, rows):
    starts.append(start_step)
    return real(self, global_batch, seed, start_step, rows)

  monkeypatch.setattr(cls, 'train_batches', recording)
  config.total_steps = 4
  resumed, _ = train.train_and_evaluate(config, str(tmp_path / 'b'))
  assert starts == [2]  # It did continue from the checkpoint.
  assert int(resumed.step) == int(straight.step) == 4
  assert _leaves_equal(straight.params, resumed.params)
  assert _leaves_equal(straight.ema_params, resumed.ema_params)
  assert _leaves_equal(straight.opt_state, resumed.opt_state)


def test_train_step_never_recompiles(count_compiles, fresh_train_step):
  config = digits.get_config('smoke')
  mesh, state, step_fn = fresh_train_step(config)
  batches = datasets.train_batches(config, config.batch_size, 0)
  step = lambda s: step_fn(s, sharding.global_batch(next(batches), mesh), None)
  state, _ = step(state)  # The first call compiles.
  with count_compiles() as compiles:
    for _ in range(4):
      state, out = step(state)
    jax.block_until_ready(out)
  assert int(state.step) == 5
  assert not compiles, compiles


def test_shardings_on_a_2x4_mesh():
  config = digits.get_config()
  config.mesh.shape = (2, 4)
  run = run_lib.resolve(config)
  mesh = run.mesh
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4}
  state, _ = state_lib.init_state(run, state_lib.make_optimizer(config.optim))
  sharded = 0
  for path, p in jax.tree_util.tree_leaves_with_path(state.params):
    spec = p.sharding.spec
    assert p.sharding.mesh.shape == mesh.shape, path
    if p.size >= sharding.MIN_FSDP_SIZE and any(d % 4 == 0 for d in p.shape):
      dim = spec.index('fsdp')
      assert p.shape[dim] == max(d for d in p.shape if d % 4 == 0), path
      assert p.addressable_shards[0].data.shape[dim] == p.shape[dim] // 4
      sharded += 1
    else:
      assert spec == P(), path
  assert sharded > 5
  # The EMA and Adam moments follow the parameters' layout.
  mu = state.opt_state[1][0].mu
  for p, m, e in zip(jax.tree.leaves(state.params), jax.tree.leaves(mu),
                     jax.tree.leaves(state.ema_params)):
    assert p.sharding == m.sharding == e.sharding
  batch = sharding.global_batch(
      next(datasets.train_batches(config, 16, 0)), mesh)
  for x in batch.values():
    assert x.sharding.spec == P(('data', 'fsdp'))
    assert {s.data.shape[0] for s in x.addressable_shards} == {2}


def test_mesh_errors():
  with pytest.raises(ValueError, match='do not fill'):
    sharding.make_mesh(('data', 'fsdp'), (-1, 3))
  with pytest.raises(ValueError, match='needs 4 devices'):
    sharding.make_mesh(('data', 'fsdp'), (2, 2))


def test_divergence_stops_before_anything_non_finite_is_saved(tmp_path):
  """A learning rate that blows up after 4 good steps: the run stops with one
  line naming the step and the newest good checkpoint, which is kept, and
  every checkpoint on disk is finite, although no loss was logged."""
  config = toy2d.get_config('smoke,stage=teacher')
  config.eval_every = 1000
  train.train_and_evaluate(config, str(tmp_path))  # Steps 2 and 4 saved.
  config.total_steps, config.ckpt_every, config.log_every = 40, 2, 1000
  config.optim.lr, config.optim.warmup_steps = 1e12, 1
  with pytest.raises(train.DivergedError) as e:
    train.train_and_evaluate(config, str(tmp_path))
  message = str(e.value)
  m = re.fullmatch(r'(.*) at step (\d+); nothing non-finite was saved, '
                   r'the newest good checkpoint is step (\d+)\.', message)
  assert m and re.fullmatch(r'((loss|grad_norm|update_norm) (nan|-?inf)(, )?)+',
                            m.group(1)), message
  bad, good = int(m.group(2)), int(m.group(3))
  assert 4 < bad and good < bad
  steps = sorted(int(s) for s in os.listdir(tmp_path / 'checkpoints'))
  assert steps[-1] == good >= 4  # The good steps were not rotated away.
  run = run_lib.resolve(config)
  for step in steps:
    params, _, _ = state_lib.load_params(
        run, str(tmp_path / 'checkpoints' / str(step)), 'params')
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))
