"""The text-to-image path: the text-conditioned UViT, caption dropout and the
null caption, guided CD and guidance distillation with captions, the stable
delta = 1 pseudo-Huber, the data the embedded default trains on, the paper's
config, and the embedded pipeline end to end."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import captioned_digits as captioned_config
from configs import text2image
from multistep_cm import conditioning
from multistep_cm import datasets
from multistep_cm import errors
from multistep_cm import losses
from multistep_cm import models
from multistep_cm import pipeline
from multistep_cm import run as run_lib
from multistep_cm import schedules
from multistep_cm.core import config as common


def _perturbed(params, scale=0.1):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(5), len(leaves))
  return jax.tree.unflatten(tree, [
      p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def _text_model(scan=False):
  config = captioned_config.get_config('smoke,stage=teacher')
  config.model.scan = scan
  return config, run_lib.resolve(config).model


CAPTIONS = conditioning.Captions(8, 32, 32)  # Captioned digits' sizes.
ONE_HOT = conditioning.Captions(4, 10)  # A one-hot class as first token.
CLASSES = conditioning.ClassLabels(10)


def _captions(n=3, length=8, dim=32):
  text = jax.random.normal(jax.random.key(0), (n, length, dim))
  # Captions of 5, 2, 8, 1, 2, ... real tokens.
  mask = jnp.arange(length)[None] < (jnp.arange(n) * 5 % length + 1)[:, None]
  return CAPTIONS.make(text, mask, text.mean(1))


@pytest.mark.parametrize('scan', [False, True])
def test_padding_tokens_do_not_change_the_output(scan):
  config, model = _text_model(scan)
  labels = _captions()
  z = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
  t = jnp.array([0.2, 0.5, 0.9])
  params = _perturbed(model.init(jax.random.key(2), z, t, labels)['params'])
  out = model.apply({'params': params}, z, t, labels)
  assert out.shape == z.shape and out.dtype == jnp.float32
  garbage = dict(labels, text=jnp.where(labels['text_mask'][..., None],
                                        labels['text'], 1e3))
  assert (model.apply({'params': params}, z, t, garbage) == out).all()
  # Real tokens do matter, and so does the caption as a whole.
  changed = dict(labels, text=labels['text'].at[:, 0].add(1.))
  assert not jnp.allclose(model.apply({'params': params}, z, t, changed), out)
  null = CAPTIONS.null(labels)
  assert not jnp.allclose(model.apply({'params': params}, z, t, null), out)
  del config


def test_class_conditional_models_have_no_text_parameters():
  from configs import digits  # pylint: disable=g-import-not-at-top
  config = captioned_config.get_config('smoke,stage=teacher')
  plain = digits.get_config('smoke,stage=teacher')
  plain_model = run_lib.resolve(plain).model
  names = str(jax.eval_shape(lambda: plain_model.init(
      jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros(1),
      jnp.zeros(1, jnp.int32))))
  assert 'cross_q' not in names and 'text_null' not in names
  run = run_lib.resolve(config)
  text = str(jax.eval_shape(lambda: run.model.init(
      jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros(1),
      run.condition.example(1))))
  assert 'cross_q' in text and 'text_null' in text and 'pooled' in text


def test_caption_dropout_gives_the_null_caption():
  labels = _captions(n=64)
  dropped = CAPTIONS.drop(jax.random.key(3), labels, 0.5)
  gone = ~dropped['text_mask'].any(1)
  assert 10 < int(gone.sum()) < 54
  for key in labels:
    kept = np.asarray(dropped[key])[~np.asarray(gone)]
    assert (kept == np.asarray(labels[key])[~np.asarray(gone)]).all()
    assert not np.asarray(dropped[key])[np.asarray(gone)].any()
  assert CAPTIONS.drop(jax.random.key(3), labels, 0.) is labels
  # Class labels draw exactly as before: where(keep, label, num_classes).
  y = jnp.arange(64) % 10
  keep = jax.random.bernoulli(jax.random.key(3), 0.5, (64,))
  assert (CLASSES.drop(jax.random.key(3), y, 0.5) ==
          jnp.where(keep, y, 10)).all()


# A toy network both ways: class c scales z by w[c] (w[10] for the null
# label); its text twin reads the class from a one-hot first token, and an
# empty caption means the null label.
def _class_net(params, z, t, labels, rng=None):
  del rng
  return z * params['w'][labels][:, None, None, None] + jnp.sin(
      jnp.asarray(t)).reshape(-1, 1, 1, 1)


def _text_net(params, z, t, labels, rng=None):
  del rng
  mask = labels['text_mask'][:, 0]
  scale = jnp.where(mask, labels['text'][:, 0] @ params['w'][:10],
                    params['w'][10])
  return z * scale[:, None, None, None] + jnp.sin(
      jnp.asarray(t)).reshape(-1, 1, 1, 1)


def _as_text(y):
  n = y.shape[0]
  text = jnp.zeros((n, 4, 10)).at[:, 0].set(jax.nn.one_hot(y, 10))
  return ONE_HOT.make(text, jnp.zeros((n, 4), bool).at[:, 0].set(True))


@pytest.mark.parametrize('w', [0.5, 3.])
def test_guided_cd_and_guidance_distillation_with_text_match_class_labels(w):
  params = {'w': jnp.linspace(0.5, 1.5, 11)}
  teacher = {'w': jnp.linspace(1.5, 0.2, 11)}
  x = jax.random.normal(jax.random.key(4), (16, 4, 4, 1))
  y = jnp.arange(16) % 10
  logsnr = schedules.get_logsnr_fn('cosine')
  rng = jax.random.key(6)
  cd = losses.ConsistencyOptions(guidance=w, condition=CLASSES,
                                 label_dropout=0.3, huber_delta=1.)
  kwargs = dict(logsnr_fn=logsnr, student_steps=4, iteration=0,
                teacher_params=teacher)
  by_class = losses.consistency_loss(_class_net, params, x, y, rng,
                                     teacher=_class_net, options=cd,
                                     **kwargs)[0]
  by_text = losses.consistency_loss(
      _text_net, params, x, _as_text(y), rng, teacher=_text_net,
      options=dataclasses.replace(cd, condition=ONE_HOT), **kwargs)[0]
  np.testing.assert_allclose(by_text, by_class, rtol=1e-6)
  gd = [losses.guidance_distillation_loss(net, params, net, teacher, x, lab,
                                          rng, logsnr, w, condition)
        for net, lab, condition in ((_class_net, y, CLASSES),
                                    (_text_net, _as_text(y), ONE_HOT))]
  np.testing.assert_allclose(gd[1], gd[0], rtol=1e-6)
  assert gd[0] > 0


def test_guidance_distillation_targets_the_guided_prediction():
  """With the student at the teacher's weights, the error is exactly the
  guidance term w (cond - uncond)."""
  teacher = {'w': jnp.linspace(1.5, 0.2, 11)}
  x = jax.random.normal(jax.random.key(4), (8, 4, 4, 1))
  y = jnp.arange(8)
  logsnr = schedules.get_logsnr_fn('cosine')
  rng = jax.random.key(7)
  loss = losses.guidance_distillation_loss(_class_net, teacher, _class_net,
                                           teacher, x, y, rng, logsnr, 2.,
                                           CLASSES)
  k_t, k_eps, _ = jax.random.split(rng, 3)
  t = jax.random.uniform(k_t, (8,))
  alpha, sigma = schedules.alpha_sigma(logsnr(t))
  z = (alpha[:, None, None, None] * x +
       sigma[:, None, None, None] * jax.random.normal(k_eps, x.shape))
  gap = (_class_net(teacher, z, t, y) -
         _class_net(teacher, z, t, jnp.full_like(y, 10)))
  np.testing.assert_allclose(loss, jnp.mean(jnp.square(2. * gap)), rtol=1e-5)


@pytest.mark.parametrize('norm', ['rms', 'sum', 'elementwise'])
def test_delta_one_pseudo_huber_matches_float64(norm):
  rng = np.random.default_rng(0)
  for scale in (1e-4, 1e-2, 1., 30.):
    err = rng.normal(size=(16, 8, 8, 3)) * scale
    sq = err**2
    m = {'rms': sq.mean((1, 2, 3)), 'sum': sq.sum((1, 2, 3)),
         'elementwise': sq}[norm]
    ref = np.sqrt(m + 1.) - 1.
    if norm == 'elementwise':
      ref = ref.mean((1, 2, 3))
    got = np.asarray(losses.pseudo_huber(jnp.asarray(err, jnp.float32), 1.,
                                         norm), np.float64)
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_captioned_digits_batches():
  config = captioned_config.get_config('smoke,stage=teacher')
  whole = next(datasets.train_batches(config, 8, 0, start_step=3,
                                  rows=slice(0, 8)))
  assert set(whole) == {'x', 'cond'}
  assert set(whole['cond']) == {'text', 'text_mask', 'pooled'}
  assert whole['cond']['text'].shape == (8, 8, 32)
  assert whole['cond']['pooled'].shape == (8, 32)
  halves = [next(datasets.train_batches(config, 8, 0, start_step=3,
                                        rows=slice(i, i + 4)))
            for i in (0, 4)]
  for got, want in zip(jax.tree.leaves(jax.tree.map(
      lambda *h: np.concatenate(h), *halves)), jax.tree.leaves(whole)):
    assert (got == want).all()


def test_missing_text_data_is_one_line():
  config = text2image.get_config('smoke')
  with pytest.raises(errors.ConfigError, match='config.dataset.text_dir'):
    datasets.check_available(config)
  config = text2image.get_config('smoke,data=/nonexistent/t2i')
  with pytest.raises(errors.UserError) as e:
    datasets.check_available(config)
  assert '\n' not in str(e.value) and '/nonexistent/t2i' in str(e.value)


def test_paper_text_to_image_size():
  # The paper's FSDP over 16 needs more devices than the test's 8 (one
  # 8-GPU node's); the network's parameters do not depend on it.
  with pytest.raises(errors.ConfigError, match='do not fill'):
    run_lib.resolve(text2image.get_config(''))
  run = run_lib.resolve(text2image.get_config('fsdp=8'))
  assert dict(run.mesh.shape) == {'data': 1, 'fsdp': 8}
  model = run.model
  params = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 512, 512, 3)), jnp.zeros(1),
      run.condition.example(1)))['params']
  count = models.count_params(params)
  assert 5e9 < count < 8e9, count
  assert params[models.SCANNED]['block']['cross_q']['kernel'].shape[0] == 16


@pytest.fixture(scope='session')
def guided_pipeline(tmp_path_factory):
  """(workdir, rows) of the embedded guided pipeline, smoke-sized, at w=3
  with a 2-step CD student."""
  workdir = tmp_path_factory.mktemp('guided')
  configs = common.StageConfigs(
      captioned_config.get_config, 'smoke',
      {'pipeline.guidance': (3.,), 'pipeline.student_steps': (2,)})
  return workdir, pipeline.run(configs, str(workdir))


@pytest.mark.xdist_group('guided_pipeline')
def test_embedded_guided_pipeline_smoke(guided_pipeline):
  """Teacher, a guidance-distilled teacher and a 2-step CD student at w=3,
  and the Table-6-shaped comparison with its grids."""
  tmp_path, rows = guided_pipeline
  names = [r['name'] for r in rows]
  assert names == ['w=3: teacher aDDIM 4', 'w=3: teacher DDPM 4',
                   'w=3: guidance-distilled teacher, DDIM 4',
                   'w=3: multistep CD, S=2']
  assert [r['nfe'] for r in rows] == [8, 8, 4, 2]
  assert all(np.isfinite(r['fd_digits']) for r in rows)
  assert all(0 <= r['trait_agreement'] <= 1 for r in rows)
  saved = json.loads((tmp_path / 'guided.json').read_text())
  assert [r['name'] for r in saved] == names
  table = (tmp_path / 'guided.md').read_text()
  assert 'real held-out digits' in table and 'trait agreement' in table
  from multistep_cm.datasets import captioned_digits  # pylint: disable=g-import-not-at-top
  first_seven = captioned_digits.prompts(1)[0][7]
  assert f'0. "{first_seven}"' in table
  assert (tmp_path / 'guided.png').exists()
  assert (tmp_path / 'w3' / 'gd_w3').is_dir()
  assert (tmp_path / 'w3' / 'cd_s2').is_dir()


@pytest.mark.xdist_group('guided_pipeline')
def test_evaluate_of_a_gd_checkpoint_with_its_own_config_runs_unguided(
    guided_pipeline):
  """`captioned_digits.py:stage=gd,guidance=3` sets config.sampler.guidance
  to 3 for the teacher it distils; the distilled model itself is sampled
  unguided (it was guided a second time, at twice the evaluations), and
  without its teacher."""
  from multistep_cm.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  from multistep_cm.evaluation import quick  # pylint: disable=g-import-not-at-top
  workdir, _ = guided_pipeline
  config = captioned_config.get_config('smoke,stage=gd,guidance=3')
  assert config.sampler.guidance == 3. and not config.teacher_checkpoint
  config.evaluate.num_samples = config.evaluate.chunk_size = 20
  config.evaluate.batch_size = 20
  record = evaluate.run(config, str(workdir / 'w3' / 'gd_w3'))
  assert (record['sampler'], record['steps'], record['nfe']) == ('ddim', 4, 4)
  assert record['sampling_guidance'] == 0. and record['guidance'] == 3.
  assert re.search(r'gd_w3/eval/step\d+_ddim4_w3_ema_n20_seed0/',
                   record['samples_npz'])
  png, _ = quick.write_samples(config, str(workdir / 'w3' / 'gd_w3'), 20)
  assert 'ddim4' in str(png)


def _tiny_encoder(captions):
  """Deterministic stand-in for a text encoder: 4 tokens of width 8."""
  emb = np.zeros((len(captions), 4, 8), np.float32)
  mask = np.zeros((len(captions), 4), bool)
  for i, caption in enumerate(captions):
    for j, word in enumerate(caption.split()[:4]):
      emb[i, j] = np.random.default_rng(sum(map(ord, word))).normal(size=8)
      mask[i, j] = True
  return emb, mask


def _tiny_clip_npz(path, config):
  from multistep_cm.evaluation import clip  # pylint: disable=g-import-not-at-top
  from multistep_cm import weights  # pylint: disable=g-import-not-at-top
  params = clip.CLIP(config).init(
      jax.random.key(0), jnp.zeros((1, config.image_size, config.image_size,
                                    3)),
      jnp.ones((1, config.context_length), jnp.int32))['params']
  flat = {'/'.join(k.key for k in path_): np.asarray(v) for path_, v in
          jax.tree_util.tree_flatten_with_path(params)[0]}
  flat[weights.CONFIG_KEY] = np.array(config.to_json())
  weights.write_npz(path, flat)


@pytest.mark.usefixtures('eigen_frechet')
def test_text_to_image_fid_and_clip_score_end_to_end(tmp_path):
  """The `text` dataset's whole path on 12 random captioned images: the data
  directory, the reference, a text-conditioned teacher, then
  --mode=evaluate with FID and the CLIP score."""
  from multistep_cm import train  # pylint: disable=g-import-not-at-top
  from multistep_cm.datasets import text_data  # pylint: disable=g-import-not-at-top
  from multistep_cm.evaluation import clip  # pylint: disable=g-import-not-at-top
  from multistep_cm.evaluation import evaluate as evaluation  # pylint: disable=g-import-not-at-top
  from multistep_cm.evaluation import fid  # pylint: disable=g-import-not-at-top
  from tests import test_evaluation  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  captions = [f'a {c} {s} square' for c, s in zip(
      ['red', 'blue', 'green'] * 4, ['small'] * 6 + ['large'] * 6)]
  text_dir = tmp_path / 'data'
  text_data.write(str(text_dir), rng.integers(0, 256, (12, 16, 16, 3),
                                               np.uint8), captions,
                  _tiny_encoder, encoder='test-words/1')
  config = text2image.get_config(f'smoke,text_len=4,text_dim=8,data={text_dir}')
  ev = config.evaluate
  ev.inception_weights = str(tmp_path / 'inception.npz')
  ev.inception_sha256 = test_evaluation.random_inception_npz(
      ev.inception_weights)
  clip_config = clip.CLIPConfig(
      embed_dim=16, image_size=32, patch_size=8, vision_width=32,
      vision_layers=1, vision_heads=2, context_length=6, vocab_size=100,
      text_width=32, text_layers=1, text_heads=2)
  ev.clip_weights = str(tmp_path / 'clip.npz')
  _tiny_clip_npz(ev.clip_weights, clip_config)
  tokens = rng.integers(1, 90, (12, 6)).astype(np.int32)
  tokens[:, 3] = 99  # End of text: the largest id.
  from multistep_cm import weights  # pylint: disable=g-import-not-at-top
  ev.clip_tokens = str(tmp_path / 'tokens.npz')
  weights.write_npz(ev.clip_tokens, {'prompts': np.array(captions),
                                      'tokens': tokens})
  ev.batch_size = 8
  ev.reference = fid.compute_reference(config, str(tmp_path / 'refs'),
                                       keep_images=8)
  # FID during training is the ImageNet test's (test_evaluation.py).
  ev.train_samples = 0
  workdir = str(tmp_path / 'run')
  state, _ = train.train_and_evaluate(config, workdir)
  assert int(state.step) == 2

  ev.num_samples, ev.chunk_size = 12, 8
  record = evaluation.run(config, workdir)
  m = record['metrics']
  assert np.isfinite(m['fid']) and 0. <= m['clip_score'] <= 1.
  assert record['clip']['sha256']
  with np.load(record['samples_npz']) as f:
    np.testing.assert_array_equal(f['arr_1'], np.arange(12))  # Caption index.

  # Tokens of other captions: one line, before anything is sampled.
  weights.write_npz(ev.clip_tokens, {
      'prompts': np.array(captions[::-1]), 'tokens': tokens})
  with pytest.raises(weights.WeightsError, match='differ first at caption 0'):
    evaluation.run(config, workdir)


def test_caption_norm_statistics_follow_norm_float32():
  """The caption's LayerNorm keeps its statistics in float32 exactly when
  config.model.norm_float32 says so, like every other norm (it ignored the
  setting)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class Tokens(nn.Module):
    norm_float32: bool

    @nn.compact
    def __call__(self, cond):
      return CAPTIONS.context(self, cond, 64, jnp.bfloat16,
                              self.norm_float32)[0]

  cond = _captions(n=8)
  cond = dict(cond, text=3. + 10. * cond['text'])  # Far from zero mean.
  params = Tokens(True).init(jax.random.key(0), cond)
  f32 = Tokens(True).apply(params, cond)
  bf16 = Tokens(False).apply(params, cond)
  assert f32.dtype == bf16.dtype == jnp.bfloat16
  assert not jnp.array_equal(f32, bf16)
  # bf16 statistics are a rounding of the float32 ones, no more.
  np.testing.assert_allclose(np.asarray(bf16, np.float32),
                             np.asarray(f32, np.float32), atol=0.1, rtol=0.1)
