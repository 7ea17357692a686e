"""The CLIP network against open_clip's, its converter and the CLIP score."""

import json
import re

import numpy as np
import pytest

from multistep_cm import weights as weights_lib
from multistep_cm.evaluation import clip
from multistep_cm.tools import convert_clip

# Small enough for CPU, with every size distinct so that a swapped axis or
# hyperparameter cannot line up by chance.
TINY = dict(
    embed_dim=24,
    vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2,
                    head_width=32, mlp_ratio=2.0),
    text_cfg=dict(context_length=16, vocab_size=100, width=48, heads=4,
                  layers=2))
EOT = TINY['text_cfg']['vocab_size'] - 1


@pytest.fixture(scope='module')
def open_clip():
  try:
    return convert_clip.import_open_clip()
  except weights_lib.WeightsError:
    return pytest.importorskip('open_clip')  # The test extra installs it.


def _random_model(open_clip, quick_gelu):
  """open_clip's CLIP with every parameter perturbed: its initialisation
  leaves biases at 0 and LayerNorms at 1, which would hide swaps of them."""
  import torch  # pylint: disable=g-import-not-at-top
  model = open_clip.model.CLIP(**TINY, quick_gelu=quick_gelu)
  gen = torch.Generator().manual_seed(int(quick_gelu))
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=gen))
  return model.eval()


def _convert(tmp_path, open_clip, quick_gelu, capsys):
  """Converts through the command line from .bin and .safetensors; returns
  (model, loaded ClipWeights)."""
  import torch  # pylint: disable=g-import-not-at-top
  from safetensors import torch as st_torch  # pylint: disable=g-import-not-at-top
  model = _random_model(open_clip, quick_gelu)
  state = model.state_dict()
  torch.save(state, tmp_path / 'model.bin')
  st_torch.save_file(state, tmp_path / 'model.safetensors')
  (tmp_path / 'config.json').write_text(json.dumps(
      dict(TINY, quick_gelu=quick_gelu)))
  digests = []
  for i, name in enumerate(['model.bin', 'model.bin', 'model.safetensors']):
    out = tmp_path / f'{i}.npz'
    convert_clip.main([f'--weights={tmp_path / name}', f'--out={out}',
                       f'--config={tmp_path / "config.json"}'])
    digests.append(capsys.readouterr().out.split('SHA-256 ')[1].strip())
    assert digests[-1] == weights_lib.sha256_of(out)
  # Reproducible, byte for byte, from either file format.
  assert len(set(digests)) == 1
  return model, clip.load_weights(str(tmp_path / '0.npz'), digests[0])


@pytest.mark.parametrize('quick_gelu', [False, True])
def test_features_match_open_clip(tmp_path, open_clip, quick_gelu, capsys):
  import torch  # pylint: disable=g-import-not-at-top
  model, weights = _convert(tmp_path, open_clip, quick_gelu, capsys)
  assert weights.config == clip.CLIPConfig(
      embed_dim=24, image_size=32, patch_size=8, vision_width=64,
      vision_layers=2, vision_heads=2, vision_mlp_ratio=2.0, context_length=16,
      vocab_size=100, text_width=48, text_layers=2, text_heads=4,
      quick_gelu=quick_gelu)
  rng = np.random.default_rng(0)

  images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  mean = torch.tensor(open_clip.constants.OPENAI_DATASET_MEAN)
  std = torch.tensor(open_clip.constants.OPENAI_DATASET_STD)
  x = (torch.from_numpy(images).float() / 255. - mean) / std
  with torch.no_grad():
    want = model.encode_image(x.permute(0, 3, 1, 2), normalize=True).numpy()
  got = clip.image_features(weights.params, images, weights.config)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)

  # End-of-text tokens at the start, middle and end, padding after them.
  tokens = rng.integers(1, EOT, (4, 16))
  for row, eot in enumerate([3, 15, 7, 0]):
    tokens[row, eot], tokens[row, eot + 1:] = EOT, 0
  with torch.no_grad():
    want = model.encode_text(torch.from_numpy(tokens), normalize=True).numpy()
  got = clip.text_features(weights.params, tokens, weights.config)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
  # Causal attention: padding cut after the last end-of-text changes nothing.
  kept = np.array([0, 2, 3])  # Their end of text is among the first 8.
  np.testing.assert_allclose(
      clip.text_features(weights.params, tokens[kept, :8], weights.config),
      got[kept], rtol=0, atol=1e-6)
  with pytest.raises(weights_lib.WeightsError, match='context'):
    clip.text_features(weights.params, np.zeros((1, 17), int), weights.config)


def test_resize_matches_open_clip_preprocessing(open_clip):
  """Shorter side resized, centre crop: as open_clip's (PIL) eval transform
  but for PIL's uint8 rounding after its slightly different bicubic."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  # Smooth but detailed: a misplaced crop moves values by many levels.
  images = np.stack([np.asarray(Image.fromarray(
      rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).resize(
          (40, 48), Image.BICUBIC)) for _ in range(2)])
  transform = open_clip.image_transform(32, is_train=False)
  want = np.stack([transform(Image.fromarray(im)).numpy().transpose(1, 2, 0)
                   for im in images])
  got = np.asarray(clip.preprocess(images, 32))
  levels = np.abs(got - want) * 255. * np.asarray(clip.STD)
  assert levels.max() < 1.01


def test_bad_checkpoints_give_one_line_errors(tmp_path, open_clip):
  model = _random_model(open_clip, quick_gelu=False)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  config = convert_clip.config_from_open_clip(TINY, 'TINY')
  cases = [
      (dict(state, **{'visual.proj': state['visual.proj'][1:]}),
       'visual/proj'),
      ({k: v for k, v in state.items() if k != 'ln_final.bias'},
       'ln_final/bias'),
      (dict(state, **{'visual.transformer.resblocks.0.ls_1.gamma':
                      np.ones(64)}), 'ls_1.gamma'),
  ]
  for bad, needle in cases:
    with pytest.raises(weights_lib.WeightsError, match=re.escape(needle)) as e:
      convert_clip.convert_state_dict(bad, config)
    assert '\n' not in str(e.value)

  # A converted file: wrong digest, tampered shape, missing file.
  arrays = convert_clip.convert_state_dict(state, config)
  arrays[weights_lib.CONFIG_KEY] = np.array([config.to_json()])
  weights_lib.write_npz(tmp_path / 'ok.npz', arrays)
  arrays['visual/proj'] = arrays['visual/proj'][:, :-1]
  weights_lib.write_npz(tmp_path / 'bad.npz', arrays)
  for path, sha, needle in [(tmp_path / 'ok.npz', '0' * 64, 'SHA-256'),
                            (tmp_path / 'bad.npz', '', 'visual/proj'),
                            (tmp_path / 'none.npz', '', 'Cannot read')]:
    with pytest.raises(weights_lib.WeightsError, match=needle) as e:
      clip.load_weights(str(path), sha)
    assert '\n' not in str(e.value)

  # Options this network lacks, and the command line's one error line.
  for part, option in [('vision_cfg', {'no_ln_pre': True}),
                       ('text_cfg', {'pool_type': 'eos'}),
                       ('vision_cfg', {'layers': [3, 4, 6, 3]})]:
    cfg = dict(TINY, **{part: dict(TINY[part], **option)})
    with pytest.raises(weights_lib.WeightsError, match='unsupported'):
      convert_clip.config_from_open_clip(cfg, 'cfg')
  with pytest.raises(SystemExit) as e:
    convert_clip.main([f'--weights={tmp_path}/none.bin', '--model=ViT-B-32',
                       f'--out={tmp_path}/x.npz'])
  assert str(e.value).startswith('error: ') and '\n' not in str(e.value)


def test_model_names_and_prompt_tokens(tmp_path, open_clip):
  assert convert_clip.model_config('ViT-B-32') == clip.CLIPConfig()
  assert convert_clip.model_config('ViT-L-14-quickgelu') == clip.CLIPConfig(
      embed_dim=768, image_size=224, patch_size=14, vision_width=1024,
      vision_layers=24, vision_heads=16, text_width=768, text_heads=12,
      quick_gelu=True)
  prompts = ['a photo of a cat', 'an astronaut riding a horse']
  (tmp_path / 'prompts.txt').write_text('\n'.join(prompts) + '\n')
  for out in ('a.npz', 'b.npz'):
    convert_clip.main([f'--prompts={tmp_path}/prompts.txt', '--model=ViT-B-32',
                       f'--out={tmp_path}/{out}'])
  digests = {weights_lib.sha256_of(tmp_path / f) for f in ('a.npz',
                                                            'b.npz')}
  assert len(digests) == 1
  got_prompts, tokens = clip.load_tokens(str(tmp_path / 'a.npz'))
  assert got_prompts == prompts and tokens.shape == (2, 77)
  np.testing.assert_array_equal(
      tokens, open_clip.get_tokenizer('ViT-B-32')(prompts).numpy())
  # Start and end of text are the two largest ids: argmax pooling finds EOT.
  assert (tokens[:, 0] == 49406).all() and (tokens.max(1) == 49407).all()


def test_clip_score_on_constructed_features():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((5, 16))
  assert clip.clip_score(a, 3. * a) == pytest.approx(1.)
  assert clip.clip_score(a, -a) == 0.  # Clamped per pair, as Hessel et al.
  e = np.eye(4)
  assert clip.clip_score(e, np.roll(e, 1, axis=0)) == pytest.approx(0.)
  # 60 degrees apart: cos = 1/2; mixed with an identical pair: (0.5 + 1) / 2.
  sixty = np.array([[1., 0.], [1., 0.]]), np.array([[.5, .75 ** .5], [2., 0.]])
  assert clip.clip_score(*sixty) == pytest.approx(0.75)
  # Per-pair clamping: one opposite pair counts 0, not -1.
  assert clip.clip_score(e[:2], np.stack([e[0], -e[1]])) == pytest.approx(0.5)
  with pytest.raises(ValueError):
    clip.clip_score(a, a[:3])
