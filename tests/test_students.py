"""Student stages (CD, CT, PD) started from a teacher checkpoint."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from multistep_cm import conditioning
from multistep_cm import datasets
from multistep_cm import run as run_lib
from multistep_cm import samplers
from multistep_cm import train
from multistep_cm.core import checkpoint
from multistep_cm import errors
from multistep_cm.core import sharding
from multistep_cm.core import stages
from multistep_cm.core import state as state_lib
from multistep_cm.evaluation import quick


@pytest.fixture
def teacher_dir(digits_teacher):
  return digits_teacher[1]


def _student(stage, teacher_dir, steps=2):
  config = digits.get_config(f'smoke,stage={stage},steps={steps}')
  config.teacher_checkpoint = teacher_dir
  return config


def _teacher_ema(teacher_dir, like):
  abstract = jax.tree.map(
      lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=p.sharding),
      like)
  return checkpoint.load_params(teacher_dir, abstract)[0]


def test_student_starts_as_the_teacher(teacher_dir, tmp_path):
  config = _student('cd', teacher_dir)
  run = run_lib.resolve(config)
  ckpt = checkpoint.Checkpointer(tmp_path / 'checkpoints', 1, 1)
  state, _ = state_lib.restore_or_init(
      run, state_lib.make_optimizer(config.optim), ckpt,
      state_lib.load_teacher(run))
  ema = _teacher_ema(teacher_dir, state.params)
  for a, b, c in zip(*(jax.tree.leaves(t) for t in (state.params,
                                                    state.ema_params, ema))):
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(b, c)
  assert int(state.step) == 0


@pytest.mark.parametrize('stage', ['cd', 'ct', 'pd'])
def test_student_stages_train(teacher_dir, tmp_path, stage):
  config = _student(stage, teacher_dir)
  state, scores = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == config.total_steps
  assert np.isfinite(scores['fd_digits'])
  ema = _teacher_ema(teacher_dir, state.params)
  moved = [float(np.abs(a - b).max()) for a, b in
           zip(jax.tree.leaves(state.params), jax.tree.leaves(ema))]
  assert max(moved) > 0  # It trained away from the teacher.


def test_mismatched_teacher(teacher_dir, tmp_path):
  config = _student('cd', teacher_dir)
  config.model.mid_channels = 48
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r'does not match config.model: \d+ parameter'):
    train.train_and_evaluate(config, str(tmp_path))


def test_missing_teacher(tmp_path):
  config = _student('cd', str(tmp_path / 'nowhere'))
  with pytest.raises(FileNotFoundError, match='No checkpoint at'):
    train.train_and_evaluate(config, str(tmp_path / 'w'))
  config.teacher_checkpoint = None
  with pytest.raises(errors.ConfigError, match='teacher_checkpoint'):
    train.train_and_evaluate(config, str(tmp_path / 'w'))


def test_no_recompilation_while_n_anneals(teacher_dir, count_compiles,
                                          fresh_train_step):
  config = _student('cd', teacher_dir, steps=4)
  config.consistency.anneal_steps = 4  # N changes at every step.
  mesh, state, step_fn = fresh_train_step(config)
  # Its own buffers: the state's are donated to the step.
  teacher = jax.tree.map(jax.numpy.copy, state.params)
  batches = datasets.train_batches(config, config.batch_size, 0)
  step = lambda s: step_fn(s, sharding.global_batch(next(batches), mesh),
                           teacher)
  state, out = step(state)  # The first call compiles.
  n_seg = [int(out['n_seg'])]
  with count_compiles() as compiles:
    for _ in range(4):
      state, out = step(state)
      n_seg.append(int(out['n_seg']))
  assert n_seg == [round(64 * 20**min(i / 4, 1) / 4) for i in range(5)]
  assert not compiles, compiles


def test_students_sample_unguided_whatever_the_teacher_sampler_says():
  """A student never saw the null label: S plain DDIM steps, one network
  evaluation each, on training-time samples, --mode=sample and the tables
  alike, even where config.sampler guides the teacher."""
  config = digits.get_config('smoke,stage=cd,steps=3')
  config.sampler.guidance = 2.
  config.train_eval.num_samples = config.train_eval.batch_size = 8
  seen = []

  class Network(nn.Module):
    """No parameters: records the labels it is given, predicts zeros."""

    def __call__(self, z, t, labels, train=False):
      del t, train
      seen.append(np.asarray(labels).tolist())
      return jnp.zeros_like(z)

  run = run_lib.resolve(config).with_model(Network())
  replicated = jax.sharding.NamedSharding(run.mesh, jax.P())
  evaluation = quick.QuickEval(run, replicated, quick.SEED_TRAINING)
  with jax.disable_jit():  # The sampler's loop runs step by step.
    samples, _ = evaluation({})
  assert samples.shape == (8, 8, 8, 1)
  assert seen == [list(range(8))] * 3  # Never the null label 10, never 2S.
  spec = stages.get('cd').sampler(config)
  assert (spec.kind, spec.steps, spec.nfe(conditioning.ClassLabels(10))) == (
      'student', 3, 3)
  with pytest.raises(ValueError, match='unguided'):
    samplers.SamplerSpec('student', 3, guidance=2.)
