"""Evaluation mode: resumable chunked generation, the protocol record, the
embedded datasets' metrics, and the Inception and DINOv2 metrics end to end
(reference statistics, FID and FD-DINOv2 during training, --mode=evaluate)
on a fake ImageNet source."""

import io
import json
import logging as py_logging
import os
import shutil

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from configs import imagenet64
from configs import toy2d
from multistep_cm import datasets
from multistep_cm import train
from multistep_cm import errors
from multistep_cm import run as run_lib
from multistep_cm import weights as weights_lib
from multistep_cm.core import generation
from multistep_cm.core import sharding
from multistep_cm.datasets import tfds_images
from multistep_cm.evaluation import dinov2
from multistep_cm.evaluation import evaluate as evaluation
from multistep_cm.evaluation import fid
from multistep_cm.tools import convert_inception
from tests import inception_golden


@pytest.fixture
def digits_run(digits_teacher):
  config, workdir = digits_teacher
  config = config.copy_and_resolve_references()
  config.evaluate.num_samples = 30
  config.evaluate.chunk_size = 10
  config.evaluate.batch_size = 8
  return config, workdir


def test_resumed_evaluation_equals_uninterrupted(digits_run, tmp_path,
                                                 monkeypatch, caplog):
  config, trained = digits_run
  full_dir, cut_dir = str(tmp_path / 'full'), str(tmp_path / 'cut')
  shutil.copytree(trained, full_dir)
  shutil.copytree(trained, cut_dir)
  with caplog.at_level(py_logging.INFO):
    full = evaluation.run(config, full_dir)
  # Too few samples for FD-digits: the result line says so, and why.
  summary = [r.getMessage() for r in caplog.records
             if r.getMessage().startswith('Evaluation ')]
  assert len(summary) == 1 and 'no FD-digits (needs at least 360 samples' in (
      summary[0]) and 'there are 30' in summary[0], summary

  calls = []
  real = generation.Generator.__call__

  def preempted_after_two(self, *args, **kwargs):
    if len(calls) == 2:
      raise KeyboardInterrupt('preempted')
    calls.append(kwargs['start'])  # The chunk's first sample index.
    return real(self, *args, **kwargs)

  monkeypatch.setattr(generation.Generator, '__call__', preempted_after_two)
  with pytest.raises(KeyboardInterrupt):
    evaluation.run(config, cut_dir)
  calls.clear()
  resumed = evaluation.run(config, cut_dir)
  assert calls == [20]  # Only the unfinished chunk is generated again.

  assert resumed['metrics'] == full['metrics']
  with np.load(full['samples_npz']) as a, np.load(resumed['samples_npz']) as b:
    assert a['arr_0'].shape == (30, 8, 8, 1) and a['arr_0'].dtype == np.uint8
    np.testing.assert_array_equal(a['arr_0'], b['arr_0'])
    np.testing.assert_array_equal(b['arr_1'], np.arange(30) % 10)
  record = json.load(open(os.path.join(os.path.dirname(
      resumed['samples_npz']), 'protocol.json')))
  assert record['sampler'] == 'addim' and record['nfe'] == 4
  assert record['num_samples'] == 30 and record['ema'] is True
  assert set(record['metrics']) == {'class_accuracy'}  # < 360: no FD-digits.
  assert set(record['not_reported']) == {'fd_digits'}


def test_a_reference_the_dataset_is_not_scored_against(tmp_path, monkeypatch):
  """Digits are scored against their train split: a reference given for them,
  above all one that does not exist, stops the run before anything is
  sampled or even loaded."""
  config = digits.get_config('smoke')
  config.evaluate.reference = str(tmp_path / 'missing.npz')
  monkeypatch.setattr(evaluation.state, 'load_for_sampling', None)
  with pytest.raises(errors.ConfigError, match='digits dataset is scored '
                     'against no reference file: leave it unset'):
    evaluation.run(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_protocols_never_mix(digits_run, tmp_path):
  config, trained = digits_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained, workdir)
  evaluation.run(config, workdir)
  other = config.copy_and_resolve_references()
  other.evaluate.chunk_size = 15  # Same directory name, other chunks.
  with pytest.raises(errors.ConfigError, match='different protocol'):
    evaluation.run(other, workdir)
  other = config.copy_and_resolve_references()
  other.evaluate.sampler = 'student'
  with pytest.raises(errors.ConfigError, match='student stage'):
    evaluation.run(other, workdir)
  other.evaluate.sampler = 'ddim'
  other.evaluate.steps = 3
  record = evaluation.run(other, workdir)
  assert record['sampler'] == 'ddim' and record['nfe'] == 3
  assert '_ddim3_' in record['samples_npz']


def test_evaluate_digits_fd_and_toy2d(tmp_path):
  config = toy2d.get_config('smoke')
  train.train_and_evaluate(config, str(tmp_path))
  config.evaluate.num_samples = 300
  config.evaluate.chunk_size = 200
  record = evaluation.run(config, str(tmp_path))
  assert np.isfinite(record['metrics']['swd'])
  with np.load(record['samples_npz']) as f:
    assert f['arr_0'].shape == (300, 2) and f['arr_0'].dtype == np.float32


def random_inception_npz(path):
  arrays = convert_inception.convert_state_dict(
      inception_golden.random_state_dict())
  weights_lib.write_npz(path, arrays)
  return weights_lib.sha256_of(path)


def random_dinov2_npz(path):
  """A narrow, one-block DINOv2 on the release's 37x37 position grid, random
  weights, in convert_dinov2's format: the metric's code path, cheaply."""
  config = dinov2.DINOv2Config(embed_dim=32, depth=1, num_heads=2)
  params = dinov2.DINOv2(config).init(
      jax.random.key(0), jnp.zeros((1, 224, 224, 3)))['params']
  arrays = {k: np.asarray(v) for k, v in weights_lib.flatten(params).items()}
  arrays[weights_lib.CONFIG_KEY] = np.array([config.to_json()])
  weights_lib.write_npz(path, arrays)
  return weights_lib.sha256_of(path)


@pytest.mark.usefixtures('eigen_frechet')
def test_imagenet_fid_end_to_end_on_a_fake_source(tmp_path, monkeypatch,
                                                  gcs_bucket):
  """The real-data code path (random access by global index, preprocessing,
  each process's share) on 12 random 64x64 examples standing in for the
  array_record files (their reading: test_tfds_source.py): reference
  statistics of both feature networks in one pass, a training run with FID
  and FD-DINOv2 at its evaluation, then --mode=evaluate with the weights,
  the reference and the workdir on gs:// (local ones: the training's
  evaluation here, and --mode=evaluate in test_imported_teacher.py and
  test_text2image.py)."""
  rng = np.random.default_rng(0)
  examples = [{'image': rng.integers(0, 256, (64, 64, 3), np.uint8),
               'label': i % 1000} for i in range(12)]
  monkeypatch.setattr(tfds_images.TfdsImages, '_source',
                      lambda self, split: examples)
  weights = str(tmp_path / 'inception.npz')
  config = imagenet64.get_config('smoke')
  config.evaluate.inception_weights = weights
  config.evaluate.inception_sha256 = random_inception_npz(weights)
  config.evaluate.batch_size = 8
  config.evaluate.dinov2_weights = str(tmp_path / 'dinov2.npz')
  config.evaluate.dinov2_sha256 = random_dinov2_npz(
      config.evaluate.dinov2_weights)
  batch = next(datasets.train_batches(config, 8, 0))
  assert batch['x'].shape == (8, 64, 64, 3) and batch['x'].dtype == np.float32
  assert -1 <= batch['x'].min() and batch['x'].max() <= 1
  ref_path = fid.compute_reference(config, str(tmp_path / 'refs'),
                                   keep_images=8)
  with np.load(ref_path) as f:
    assert int(f['num_images']) == 12  # All of them, the last batch padded.
    assert f['arr_0'].shape == (8, 64, 64, 3) and f['mu'].shape == (2048,)
    assert f['sigma'].dtype == np.float64
    assert f['dinov2_mu'].shape == (32,) and f['dinov2_sigma'].shape == (32, 32)

  config.evaluate.reference = ref_path
  config.evaluate.train_samples = 8
  config.evaluate.train_dinov2 = True
  workdir = str(tmp_path / 'run')
  state, scores = train.train_and_evaluate(config, workdir)
  assert int(state.step) == 2
  assert np.isfinite(scores['fid']) and scores['fid'] > 0
  assert np.isfinite(scores['fd_dinov2']) and scores['fd_dinov2'] > 0

  # The run copied to gs:// (its checkpoints, as `gcloud storage cp -r`
  # copies them), and the weights and the reference beside it.
  remote = gcs_bucket.path('run')
  gcs_bucket.upload(os.path.join(workdir, 'checkpoints'), 'run', 'checkpoints')
  for key in ('inception_weights', 'dinov2_weights', 'reference'):
    url = gcs_bucket.path(os.path.basename(config.evaluate[key]))
    epath.Path(url).write_bytes(epath.Path(config.evaluate[key]).read_bytes())
    config.evaluate[key] = url
  config.evaluate.num_samples = 12
  config.evaluate.chunk_size = 8
  record = evaluation.run(config, remote)
  m = record['metrics']
  assert np.isfinite(m['fid']) and m['inception_score'] >= 1.
  assert 0 <= m['precision'] <= 1 and 0 <= m['recall'] <= 1
  assert record['reference']['path'] == config.evaluate.reference
  out = epath.Path(record['samples_npz']).parent
  assert os.fspath(out).startswith(f'{remote}/eval/step2_')
  # What it wrote, complete (no *.tmp left), on gs:// and read back from it.
  prefix = f'run/eval/{out.name}/'
  assert sorted(gcs_bucket.names(prefix)) == [prefix + f for f in (
      'chunk_00000.npz', 'chunk_00001.npz', 'grid.png', 'protocol.json',
      'samples.npz', 'spec.json')]
  assert json.loads((out / 'protocol.json').read_text()) == json.loads(
      json.dumps(record))
  assert (out / 'grid.png').read_bytes().startswith(b'\x89PNG\r\n\x1a\n')
  assert record['inception']['sha256'] == config.evaluate.inception_sha256
  assert record['dinov2']['sha256'] == config.evaluate.dinov2_sha256
  assert np.isfinite(m['fd_dinov2']) and m['fd_dinov2'] > 0
  # Chunks without DINOv2 features never serve it: a directory of its own.
  assert os.path.dirname(record['samples_npz']).endswith('_dinov2')
  assert record['reference']['statistics'] == {'fid': 'from the file',
                                               'fd_dinov2': 'from the file'}
  samples = (out / 'samples.npz').read_bytes()
  with np.load(io.BytesIO(samples)) as f:
    assert f['arr_0'].shape == (12, 64, 64, 3) and f['arr_0'].dtype == np.uint8
    np.testing.assert_array_equal(f['arr_1'], np.arange(12) % 1000)
  # The features were computed from exactly the uint8 images written: what
  # the ADM evaluator reads from samples.npz.
  params = fid.Detectors(config).params['inception']
  mesh = sharding.make_mesh(('data', 'fsdp'), (-1, 1))
  chunk = io.BytesIO((out / 'chunk_00000.npz').read_bytes())
  weights = dinov2.load_weights(config.evaluate.dinov2_weights)
  with np.load(io.BytesIO(samples)) as f, np.load(chunk) as c:
    feats, _ = fid.image_features(f['arr_0'][:8], params, mesh, 8)
    np.testing.assert_allclose(feats, c['features'], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        dinov2.features_fn(weights.params, weights.config)(f['arr_0'][:8]),
        c['dinov2'], rtol=1e-5, atol=1e-6)


def test_protocol_of_a_guided_student():
  config = digits.get_config('stage=cd,steps=4')
  config.consistency.guidance = 1.5
  p = evaluation.protocol(run_lib.resolve(config), step=7)
  assert (p['sampler'], p['steps'], p['nfe']) == ('student', 4, 4)
  assert p['guidance'] == 1.5 and p['sampling_guidance'] == 0.
  assert evaluation.protocol_name(p) == 'step7_student4_w1.5_ema_n1080_seed0'
  config.evaluate.guidance = 2.
  run = run_lib.resolve(config)
  with pytest.raises(errors.ConfigError, match='cannot be guided'):
    evaluation.protocol(run, step=7)
  config.evaluate.sampler = 'addim'  # The teacher's sampler on its weights:
  run = run_lib.resolve(config)
  with pytest.raises(errors.ConfigError, match='cannot be guided'):
    evaluation.protocol(run, step=7)  # still never guided.
  config.evaluate.guidance = -1.
  p = evaluation.protocol(run_lib.resolve(config), step=7)
  assert p['nfe'] == p['steps'] and p['sampling_guidance'] == 0.
  assert p['guidance'] == 1.5  # The distillation's, on record.


def test_noise_of_a_sample_is_independent_of_its_batch():
  whole = generation.example_noise(np.array([5, 0]), 10, (4,))
  tail = generation.example_noise(np.array([5, 3]), 7, (4,))
  np.testing.assert_array_equal(np.asarray(whole)[3:], np.asarray(tail))
  other_seed = generation.example_noise(np.array([6, 3]), 7, (4,))
  assert not np.allclose(np.asarray(other_seed), np.asarray(tail))


def test_trait_agreement_measures_the_trait_each_prompt_names():
  """Samples that are training digits of the prompt's class with the trait
  the prompt names agree at 1; with the other value of that trait, at 0."""
  from multistep_cm.datasets import captioned_digits  # pylint: disable=g-import-not-at-top
  from multistep_cm.evaluation import scoring  # pylint: disable=g-import-not-at-top
  x, y, _, traits = captioned_digits.captions('train')
  n = 40
  labels = np.arange(n) % 10
  trait, value = captioned_digits.prompt_traits(n)
  opposite = {'thin': 'thick', 'thick': 'thin', 'upright': 'slanted',
              'slanted': 'upright'}
  scorer = scoring.DigitCaptions()
  for want, agreement in ((value, 1.), ([opposite[v] for v in value], 0.)):
    picks = [np.flatnonzero((y == c) & (traits[t] == v))[0]
             for c, t, v in zip(labels, trait, want)]
    scores = scorer.score({'samples': x[picks]}, labels)
    assert scores['trait_agreement'] == agreement
    assert scores['class_accuracy'] > 0.9
