"""The extension points, used as a newcomer would: a dataset with a kind of
conditioning of its own and a scorer of its own, all defined in this file
and registered, then trained, sampled guided and unguided, and scored; a
sampler of its own, one row, evaluated and exported; and a network imported
from elsewhere (its module, its converter, its row), its weights converted,
sampled and distilled; without a change to any package file."""

import dataclasses
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import digits
from configs import toy2d
from multistep_cm import conditioning
from multistep_cm import datasets
from multistep_cm import export_writer
from multistep_cm import exported
from multistep_cm import networks
from multistep_cm import run as run_lib
from multistep_cm import samplers
from multistep_cm import schedules
from multistep_cm import train
from multistep_cm import weights
from multistep_cm.core import stages
from multistep_cm.core import state as state_lib
from multistep_cm.datasets import base
from multistep_cm.datasets import digits as digits_data
from multistep_cm.evaluation import evaluate
from multistep_cm.evaluation import quick
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

  def eval_cond(self, labels):
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
  assert run_lib.resolve(config).condition == Bits()

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
  record = evaluate.protocol(run_lib.resolve(config), test_export.STEP)
  assert (record['sampler'], record['nfe']) == ('renoise', 2)
  directory = export_writer.run(config, str(workdir))
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


# A network imported from elsewhere, in three parts as in the package: its
# module (the network, wrapped as a v-prediction, and its weight format),
# its converter (the source's names to the module's), its row.


class ForeignDenoiser(nn.Module):
  """An x-prediction MLP of (z, t), as trained elsewhere; unconditional."""
  hidden: int

  @nn.compact
  def __call__(self, z, t):
    h = jnp.concatenate([z, jnp.broadcast_to(t, z.shape[:1])[:, None]], -1)
    h = nn.tanh(nn.Dense(self.hidden)(h))
    return nn.Dense(z.shape[-1])(h)


@dataclasses.dataclass(frozen=True)
class ForeignConfig:
  hidden: int = 16

  def to_json(self):
    return f'{{"hidden": {self.hidden}}}'

  @classmethod
  def from_json(cls, text):
    return cls(int(text.split(':')[1].strip(' }')))


class Imported(nn.Module):
  """The foreign denoiser as this framework's network: v = (alpha z - x) /
  sigma of its x prediction (alpha^2 + sigma^2 = 1)."""
  config: ForeignConfig
  logsnr_fn: object

  @nn.compact
  def __call__(self, z, t, cond, train=False):
    del cond, train  # Unconditional: its null condition is any condition.
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), z.shape[:1])
    x = ForeignDenoiser(self.config.hidden, name='net')(z, t)
    alpha, sigma = schedules.alpha_sigma(self.logsnr_fn(t))
    return (alpha[:, None] * z - x) / sigma[:, None]


def _foreign_shapes(config):
  abstract = jax.eval_shape(ForeignDenoiser(config.hidden).init,
                            jax.random.key(0), jnp.zeros((1, 2)),
                            jnp.zeros((1,)))['params']
  return weights.shapes(abstract)


FOREIGN = weights.Format(
    what='foreign denoiser weights', converter='convert_foreign',
    how_to_get='Convert its state dict with convert_foreign.',
    param_shapes=_foreign_shapes, config_type=ForeignConfig)


def convert_foreign(state_dict, path):
  """The converter: torch-style names and (out, in) matrices to the
  module's; returns the written file's SHA-256."""
  arrays = {}
  for i, layer in enumerate(('fc1', 'fc2')):
    arrays[f'Dense_{i}/kernel'] = state_dict[f'{layer}.weight'].T
    arrays[f'Dense_{i}/bias'] = state_dict[f'{layer}.bias']
  return FOREIGN.write(path, arrays, ForeignConfig(
      hidden=state_dict['fc1.weight'].shape[0]))


FOREIGN_ROW = networks.Network(
    lambda fields, condition, logsnr_fn: Imported(
        ForeignConfig(fields['hidden']), logsnr_fn),
    weights=FOREIGN, weights_scope='net')


@pytest.fixture
def foreign_weights(tmp_path):
  networks.register('foreign', FOREIGN_ROW)
  rng = np.random.default_rng(0)
  state_dict = {'fc1.weight': rng.normal(size=(16, 3)).astype(np.float32),
                'fc1.bias': rng.normal(size=16).astype(np.float32),
                'fc2.weight': rng.normal(size=(2, 16)).astype(np.float32),
                'fc2.bias': rng.normal(size=2).astype(np.float32)}
  path = tmp_path / 'foreign.npz'
  digest = convert_foreign(state_dict, path)
  yield state_dict, str(path), digest
  del networks.TABLE['foreign']


def _foreign_config(arg, path, digest):
  config = toy2d.get_config(arg)
  config.model = ml_collections.ConfigDict({'name': 'foreign', 'hidden': 16})
  config.imported_weights = path
  config.teacher_sha256 = digest
  return config


def test_a_new_imported_network(foreign_weights, tmp_path):
  state_dict, path, digest = foreign_weights
  # Converted once, byte for byte: the same input gives the same file.
  assert convert_foreign(state_dict, tmp_path / 'again.npz') == digest
  config = _foreign_config('smoke,stage=teacher', path, digest)
  run = run_lib.resolve(config)
  params, _ = state_lib.load_imported(run, path, digest)
  np.testing.assert_array_equal(params['net']['Dense_1']['kernel'],
                                state_dict['fc2.weight'].T)
  # Its network is the foreign x prediction, as a v prediction.
  z, t = jnp.ones((3, 2)), jnp.full((3,), 0.5)
  x = state_dict['fc2.weight'] @ np.tanh(
      state_dict['fc1.weight'] @ np.array([1., 1., .5]) +
      state_dict['fc1.bias']) + state_dict['fc2.bias']
  alpha, sigma = schedules.alpha_sigma(run.logsnr_fn(t))
  np.testing.assert_allclose(run.network(params, z, t, None)[0],
                             (alpha[0] * z[0] - x) / sigma[0], rtol=1e-5)

  # Sampled from its converted weights, with no checkpoint.
  png, npz = quick.write_samples(config, str(tmp_path / 'sampled'), 16)
  assert png.exists() and npz.exists()

  # A wrong file is one error line naming how to get the right one.
  bad = tmp_path / 'bad.npz'
  weights.write_npz(bad, {'Dense_0/kernel': np.zeros((3, 4), np.float32),
                          weights.CONFIG_KEY: np.array(['{"hidden": 16}'])})
  with pytest.raises(weights.WeightsError,
                     match='does not match the network.*convert_foreign'):
    state_lib.load_imported(run, str(bad))

  # A student distilled from it: its teacher read from the converted file.
  cd_config = _foreign_config('smoke,stage=cd', path, digest)
  cd_config.teacher_checkpoint = path
  state, scores = train.train_and_evaluate(cd_config, str(tmp_path / 'cd'))
  assert int(state.step) == cd_config.total_steps
  assert np.isfinite(scores['swd'])
