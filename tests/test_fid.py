"""The FID Inception, its weight converter and the metrics built on it."""

import os
import pickle
import types

import jax
import numpy as np
import pytest

from multistep_cm import weights
from multistep_cm.core import sharding
from multistep_cm.evaluation import fid
from multistep_cm.evaluation import inception
from multistep_cm.evaluation import metrics
from multistep_cm.tools import convert_inception
from multistep_cm.tools import converting
from tests import frechet
from tests import inception_golden


@pytest.mark.parametrize('n', [2000, 48])  # 48 < d: singular covariances.
def test_frechet_distance_against_independent_formula(n):
  rng = np.random.default_rng(n)
  d = 64
  mix = rng.standard_normal((d, d)) / np.sqrt(d)
  a = rng.standard_normal((n, d)) @ mix
  b = rng.standard_normal((n, d)) @ (mix + 0.3 * np.eye(d)) + 0.2
  stats_a, stats_b = metrics.gaussian_stats(a), metrics.gaussian_stats(b)
  got = metrics.frechet_distance(*stats_a, *stats_b)
  want = frechet.independent_fd(*stats_a, *stats_b)
  assert got == pytest.approx(want, rel=1e-6)
  assert metrics.frechet_distance(*stats_a, *stats_a) == pytest.approx(
      0., abs=1e-6 * np.trace(stats_a[1]))


def test_inception_score_on_constructed_logits():
  k, n = 10, 1000
  confident = np.full((n, inception.CLASSES), -50.)
  confident[np.arange(n), np.arange(n) % k] = 50.  # Every split sees k classes.
  assert metrics.inception_score(confident)[0] == pytest.approx(k, rel=1e-9)
  # Sorted by class, each of the 10 splits holds one class: p(y) equals
  # p(y|x) inside a split, so the score is 1 though the whole set has 10.
  by_class = confident[np.argsort(np.arange(n) % k, kind='stable')]
  assert metrics.inception_score(by_class)[0] == pytest.approx(1., abs=1e-9)
  # Uniform predictions carry no information either.
  assert metrics.inception_score(np.zeros((n, 7)))[0] == pytest.approx(1.)
  # Two equiprobable classes at 0.9/0.1 confidence: exp(KL) in closed form.
  p = np.array([[0.9, 0.1], [0.1, 0.9]] * 500)
  kl = 0.9 * np.log(0.9 / 0.5) + 0.1 * np.log(0.1 / 0.5)
  score, std = metrics.inception_score(np.log(p))
  assert score == pytest.approx(np.exp(kl), rel=1e-9) and std < 1e-9
  # Fewer samples than splits: a sample alone scores 1, never NaN.
  assert metrics.inception_score(confident[:4]) == (1., 0.)


def test_precision_recall_on_constructed_points():
  # Real: 100 points 1 apart on a line, so every k=3 radius is 3 (the ends'
  # too, reaching inward). Fake: the first 50 of them.
  real = np.stack([np.arange(100.), np.zeros(100)], 1)
  fake = real[:50]
  precision, recall = metrics.precision_recall(real, fake, k=3, block=32)
  assert precision == 1.  # Every fake point is a real one.
  assert recall == pytest.approx(0.53)  # Reals 0..49, plus 50..52 near 49.
  far = metrics.precision_recall(real, fake + [0., 10.], k=3, block=32)
  assert far == (0., 0.)


def test_feature_stats_over_8_devices_equal_single_device():
  rng = np.random.default_rng(0)
  n, d = 1000, 2048
  feats = (rng.standard_normal((n, d)) * rng.uniform(0.1, 3., d) + 1.).astype(
      np.float32)
  mask = np.arange(n) < 997  # The last rows are padding.
  mesh = sharding.make_mesh(('data', 'fsdp'), (-1, 1))
  assert mesh.size == 8
  sharded = metrics.FeatureStats(d)
  sharded.add(sharding.batch_from_full(feats, mesh), mask)
  single = metrics.FeatureStats(d)
  single.add(jax.device_put(feats, jax.devices()[0]), mask)
  assert sharded.totals()[0] == single.totals()[0] == 997
  # Relative to the largest entry: near-zero covariances carry no meaning
  # beyond that.
  def rel(a, b):
    return np.max(np.abs(a - b)) / np.max(np.abs(b))
  for got, want in zip(sharded.mu_sigma(), single.mu_sigma()):
    assert rel(got, want) < 1e-10
  # And both agree with the textbook two-pass estimate.
  for got, want in zip(sharded.mu_sigma(), metrics.gaussian_stats(feats[mask])):
    assert rel(got, want) < 1e-10


def _write_random_pth(path):
  import torch  # pylint: disable=g-import-not-at-top
  torch.save({k: torch.from_numpy(v) for k, v in
              inception_golden.random_state_dict().items()}, path)


def test_converter_and_features_match_pytorch_fid(tmp_path, capsys):
  """Random weights under pytorch-fid's names and shapes, through the
  converter, give pytorch-fid's own outputs (inception_golden.py)."""
  pth, out = tmp_path / 'fid_weights.pth', tmp_path / 'inception.npz'
  _write_random_pth(pth)
  convert_inception.main([f'--pth={pth}', f'--out={out}'])
  digest = capsys.readouterr().out.split('SHA-256 ')[1].split()[0]
  assert digest == weights.sha256_of(out)
  # Reproducible: converting again writes the same bytes.
  convert_inception.main([f'--pth={pth}', f'--out={out}.2'])
  assert weights.sha256_of(f'{out}.2') == digest

  params = inception.load_params(str(out), digest)
  model = inception.InceptionV3()
  feats, logits = jax.jit(model.apply)({'params': params},
                                       inception_golden.inputs())
  golden = np.load(inception_golden.GOLDEN)
  for got, want in ((feats, golden['features']), (logits, golden['logits'])):
    err = np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want))
    assert err < 1e-4


def test_weight_errors_are_one_clear_message(tmp_path):
  with pytest.raises(weights.WeightsError, match='convert_inception'):
    inception.load_params(str(tmp_path / 'nowhere.npz'))
  good = {k: np.zeros(s, np.float32) for k, s in inception.param_shapes().items()}
  path = str(tmp_path / 'w.npz')
  weights.write_npz(path, good)
  with pytest.raises(weights.WeightsError, match='SHA-256'):
    inception.load_params(path, '0' * 64)
  del good['Mixed_7c/branch_pool/conv/kernel']
  good['fc'] = np.zeros((2048, 1000), np.float32)
  weights.write_npz(path + '2.npz', good)
  with pytest.raises(weights.WeightsError,
                     match='1 missing .* wrong shape'):
    inception.load_params(path + '2.npz')
  with pytest.raises(weights.WeightsError, match='Unexpected'):
    convert_inception.convert_state_dict({'features.0.weight': np.zeros(3)})
  # A download whose content does not match the hash in its name.
  bad = tmp_path / 'pt_inception-2015-12-05-6726825d.pth'
  bad.write_bytes(b'truncated')
  with pytest.raises(weights.WeightsError, match='6726825d'):
    converting.check_name_hash(str(bad))
  # Bytes torch cannot read end the command in one line, as the other
  # converters' do, not in torch's traceback.
  for name, content in (('notes.pth', b'not a checkpoint\n'),
                        ('random.pth', np.random.default_rng(0).bytes(512))):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(SystemExit) as e:
      convert_inception.main([f'--pth={tmp_path / name}',
                              f'--out={tmp_path / "x.npz"}'])
    assert str(e.value).startswith('error: ') and '\n' not in str(e.value)
    assert 'not a torch state dict' in str(e.value)


def test_resize_matches_tf1_bilinear():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(0).integers(0, 256, (2, 64, 48, 3), np.uint8)
  want = tf.compat.v1.image.resize_bilinear(
      x.astype(np.float32), (299, 299), align_corners=False,
      half_pixel_centers=False).numpy()
  got = np.asarray(inception.preprocess(x)) * 128. + 128.
  np.testing.assert_allclose(got, want, atol=2e-3)  # Of 255.
  # 299x299 input passes through untouched, into [-1, 1).
  same = np.random.default_rng(1).integers(0, 256, (1, 299, 299, 3), np.uint8)
  np.testing.assert_array_equal(np.asarray(inception.preprocess(same)),
                                (same.astype(np.float32) - 128.) / 128.)


def test_adm_reference_files(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 8, 8, 3), np.uint8)
  path = str(tmp_path / 'VIRTUAL_tiny.npz')
  np.savez(path, arr_0=images, mu=np.ones(4, np.float32),
           sigma=np.eye(4, dtype=np.float32), mu_s=np.zeros(2))
  ref = fid.load_reference(path)
  mu, sigma = ref.stats['fid']
  assert set(ref.stats) == {'fid'}  # No DINOv2 statistics in ADM's files.
  assert mu.dtype == np.float64 and sigma.shape == (4, 4)
  np.testing.assert_array_equal(ref.images, images)
  assert len(ref.sha256) == 64
  with pytest.raises(fid.ReferenceError, match='Cannot read'):
    fid.load_reference(str(tmp_path / 'missing.npz'))
  np.savez(path, arr_0=images.astype(np.float32))
  with pytest.raises(fid.ReferenceError, match='uint8'):
    fid.load_reference(path)
  with pytest.raises(fid.ReferenceError, match='VIRTUAL_imagenet'):
    fid.load_reference('')


class _Payload:
  """Runs code when unpickled, as any class in a pickle may."""

  def __reduce__(self):
    return (os.system, ('echo pwned',))


def test_edm2_reference_files_are_read_as_arrays_only(tmp_path):
  """EDM2's reference statistics are pickled dicts ({'fid': {'mu', 'sigma'},
  'fd_dinov2': {...}}, as its calculate_metrics.py saves them): read for
  their arrays, and a pickle that would run code is refused unrun."""
  rng = np.random.default_rng(0)
  want = {m: {'mu': rng.standard_normal(d).astype(np.float64),
              'sigma': np.cov(rng.standard_normal((50, d)), rowvar=False)}
          for m, d in (('fid', 6), ('fd_dinov2', 4))}
  path = tmp_path / 'img64.pkl'
  path.write_bytes(pickle.dumps({**want, 'num_images': 50}))
  ref = fid.load_reference(str(path))
  assert set(ref.stats) == {'fid', 'fd_dinov2'} and ref.images is None
  for m in want:
    np.testing.assert_array_equal(ref.stats[m][0], want[m]['mu'])
    np.testing.assert_array_equal(ref.stats[m][1], want[m]['sigma'])
  path.write_bytes(pickle.dumps({'fid': {'mu': _Payload(), 'sigma': 0}}))
  with pytest.raises(fid.ReferenceError, match='posix.system|os.system'):
    fid.load_reference(str(path))
  path.write_bytes(pickle.dumps({'fd_dinov2': {'mu': np.zeros(3),
                                               'sigma': np.eye(2)}}))
  with pytest.raises(fid.ReferenceError, match=r'\(3,\) and \(2, 2\)'):
    fid.load_reference(str(path))


def test_statistics_a_reference_lacks_come_from_its_images_or_an_error(
    tmp_path):
  both = types.SimpleNamespace(metrics=('fid', 'fd_dinov2'))
  path = tmp_path / 'img64.pkl'
  path.write_bytes(pickle.dumps({'fid': {'mu': np.zeros(3),
                                         'sigma': np.eye(3)}}))
  ref = fid.load_reference(str(path))
  assert fid.reference_stats(ref, types.SimpleNamespace(metrics=('fid',)),
                             None, 8) == ref.stats
  with pytest.raises(fid.ReferenceError, match='no fd_dinov2 statistics'):
    fid.reference_stats(ref, both, None, 8)


def test_random_weights_fixture_is_pytorch_fid_shaped():
  """The converter accepts exactly pytorch-fid's key set (566 entries,
  num_batches_tracked included)."""
  sd = inception_golden.random_state_dict()
  assert len(sd) == 566 and sd['fc.weight'].shape == (1008, 2048)
  converted = convert_inception.convert_state_dict(sd)
  assert set(converted) == set(inception.param_shapes())
  assert os.path.exists(inception_golden.GOLDEN)
