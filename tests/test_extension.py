"""The extension points, used as a newcomer would: a dataset with a kind of
conditioning of its own and a scorer of its own, all defined in this file
and registered, then trained, sampled guided and unguided, and scored; and
a sampler of its own, one row, evaluated and exported; without a change to
any package file."""

import dataclasses
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from multistep_cm import conditioning
from multistep_cm import datasets
from multistep_cm import export
from multistep_cm import exported
from multistep_cm import samplers
from multistep_cm import train
from multistep_cm.core import stages
from multistep_cm.core import state as state_lib
from multistep_cm.datasets import base
from multistep_cm.datasets import digits as digits_data
from multistep_cm.evaluation import evaluate
from multistep_cm.evaluation import scoring
from tests import test_export
from tests.test_export import student  # pylint: disable=unused-import


@dataclasses.dataclass(frozen=True)
class Bits(conditioning.Condition):
  """A vector of `width` attributes in {-1, +1} (here the bits of a digit's
  class); the null condition is all zeros."""
  width: int = 4

  @property
  def conditional(self):
    return True

  def example(self, n):
    return jnp.zeros((n, self.width))

  def null(self, cond):
    return jnp.zeros_like(cond)

  def vector(self, cond, dim, dtype):
    return nn.Dense(dim, dtype=dtype, name='bits')(cond)


def _bits(labels):
  labels = np.asarray(labels)
  return (((labels[:, None] >> np.arange(4)) & 1) * 2. - 1.).astype(
      np.float32)


class DigitBits(base.Dataset):
  """The 8x8 digits, each conditioned on the 4 bits of its class."""
  scorer = 'mean_ink'
  condition = Bits()
  grid_columns = 10

  def train_batches(self, global_batch, seed, start_step, rows):
    x, y = digits_data.load('train')
    return base.indexed_batches({'x': x, 'cond': _bits(y)}, global_batch,
                                rows, seed, start_step)

  def eval_labels(self, n):
    return (np.arange(n) % 10).astype(np.int32)

  def eval_conditioning(self, labels):
    return _bits(labels)


class MeanInk(scoring.Scorer):
  """The mean brightness of the samples."""
  metrics = (scoring.Metric('mean_ink', 'mean ink', False),)

  def score(self, outputs, labels):
    x = outputs['samples']
    x = x / 255. if x.dtype == np.uint8 else (x + 1.) / 2.
    return {'mean_ink': float(np.mean(x)), 'n': len(labels)}


@pytest.fixture
def registered():
  datasets.register('digit_bits', DigitBits)
  scoring.register('mean_ink', MeanInk)
  yield
  del datasets.TABLE['digit_bits'], scoring.SCORERS['mean_ink']


def test_a_new_dataset_with_its_own_conditioning(registered, tmp_path):
  del registered
  config = digits.get_config('smoke,stage=teacher')
  config.dataset.name = 'digit_bits'
  config.total_steps = config.eval_every = 4
  # Far enough from the zero-initialised output for the condition to matter.
  config.optim.warmup_steps, config.optim.lr = 1, 1e-2
  config.train_eval.num_samples = config.train_eval.batch_size = 20
  config.evaluate.num_samples = config.evaluate.chunk_size = 20
  config.evaluate.batch_size = 20
  config.sampler.steps = 3
  workdir = str(tmp_path / 'run')

  state, scores = train.train_and_evaluate(config, workdir)
  assert int(state.step) == 4 and scores['n'] == 20
  assert 0 < scores['mean_ink'] < 1
  # The condition built the network's input: a parameter of the model.
  assert state.params['Conditioning_0']['bits']['kernel'].shape == (4, 32)
  assert state_lib.condition(config) == Bits()

  records = {}
  for w in (0., 2.):
    config.evaluate.guidance = w
    records[w] = evaluate.run(config, workdir)
  assert records[0.]['nfe'] == 3 and records[2.]['nfe'] == 6
  assert records[2.]['sampling_guidance'] == 2.
  for record in records.values():
    assert 0 < record['metrics']['mean_ink'] < 1
  with np.load(records[0.]['samples_npz']) as a, np.load(
      records[2.]['samples_npz']) as b:
    # The same noise: guidance (through the null condition) changed them.
    assert not np.array_equal(a['arr_0'], b['arr_0'])
    np.testing.assert_array_equal(a['arr_1'], np.arange(20) % 10)


def test_the_new_condition_drops_and_guides():
  cond = jnp.asarray(_bits(np.arange(64) % 10))
  dropped = Bits().drop(jax.random.key(0), cond, 0.5)
  gone = ~np.asarray(dropped).any(1)
  assert 10 < gone.sum() < 54
  np.testing.assert_array_equal(np.asarray(dropped)[~gone],
                                np.asarray(cond)[~gone])


def _renoise_step(x, z, a_t, s_t, a_s, s_s, *, noise, **_):
  """z_s drawn afresh from the forward process at s around the x prediction,
  forgetting z_t: a stochastic sampler that is not the ancestral one."""
  del z, a_t, s_t
  return a_s * x + s_s * noise


def test_a_new_sampler_is_one_row(monkeypatch, student, tmp_path):
  monkeypatch.setitem(samplers.KINDS, 'renoise', samplers.Kind(
      're-noised', _renoise_step, stochastic=True))
  config, trained = student
  workdir = tmp_path / 'cd_s4'
  shutil.copytree(trained, workdir)
  config = config.copy_and_resolve_references()
  config.evaluate.sampler, config.evaluate.steps = 'renoise', 2

  spec = stages.evaluation_sampler(config)
  assert spec.label == 're-noised 2'
  record = evaluate.protocol(config, test_export.STEP)
  assert (record['sampler'], record['nfe']) == ('renoise', 2)
  directory = export.run(config, str(workdir))
  sampler = exported.load(directory)
  assert directory.name == f'step{test_export.STEP}_renoise2'
  assert sampler.manifest['sampler']['kind'] == 'renoise'
  assert sampler.manifest['nfe'] == 2
  # Its program takes the per-step keys the row says it draws from.
  assert sampler.manifest['stochastic']
  labels = (np.arange(7) % 10).astype(np.int32)
  ours = sampler.sample(test_export.SEED, labels)
  np.testing.assert_array_equal(
      ours, test_export.in_process(config, workdir, [7], spec)[7])
  # Its own step, not the ancestral one, from the same noise and keys.
  ddpm = stages.get(config.stage).sampler(config, 'ddpm', 2)
  assert not np.array_equal(
      ours, test_export.in_process(config, workdir, [7], ddpm)[7])
