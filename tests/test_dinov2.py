"""The DINOv2 network against timm's, its converter, and EDM2's preprocessing.

The references are torch's own ops: timm's DINOv2 ViT (the original
release's architecture and names), a transcription of the original
`interpolate_pos_encoding`, and of EDM2's DINOv2 detector's preprocessing.
"""

import importlib
import math
import re

import jax
import numpy as np
import pytest

from multistep_cm import weights as weights_lib
from multistep_cm.evaluation import dinov2
from multistep_cm.tools import convert_clip
from multistep_cm.tools import convert_dinov2

torch = pytest.importorskip('torch')

# Small enough for CPU, at the real 37x37 position grid of 518 / 14: width
# 128 in two heads of 64 (the converter's width / 64 rule), MLP 384, so that
# no two widths coincide.
TINY = dict(embed_dim=128, depth=2, num_heads=2, mlp_ratio=3.0)


@pytest.fixture(scope='module')
def timm():
  try:
    return convert_clip.past_cuda_torchvision(
        'timm', lambda: importlib.import_module('timm'))
  except ImportError:
    return pytest.importorskip('timm')  # The test extra installs it.


def _random_model(timm, **kwargs):
  """timm's DINOv2 ViT at 518 (grid 37), every parameter perturbed: its
  initialisation leaves biases at 0, LayerNorms at 1 and LayerScale at 1e-5,
  which would hide swaps and make the blocks all but vanish."""
  model = timm.create_model('vit_large_patch14_dinov2', pretrained=False,
                            **TINY, **kwargs)
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.endswith('.gamma'):
        p.copy_(1. + .2 * noise)
      elif name == 'pos_embed':  # Large enough to matter in the features.
        p.copy_(.5 * noise)
      else:
        p.add_(.05 * noise)
  return model.eval()


def original_pos_embed(pos_embed, h, w):
  """The original DINOv2 `interpolate_pos_encoding` (facebookresearch/
  dinov2, models/vision_transformer.py) for an (h, w) patch grid."""
  n = pos_embed.shape[1] - 1
  m = int(math.sqrt(n))
  if h * w == n and h == w:
    return pos_embed
  patches = torch.nn.functional.interpolate(
      pos_embed[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2),
      mode='bicubic', antialias=False,
      scale_factor=((h + 0.1) / m, (w + 0.1) / m))
  assert patches.shape[-2:] == (h, w)
  return torch.cat([pos_embed[:, :1],
                    patches.permute(0, 2, 3, 1).reshape(1, h * w, -1)], 1)


def edm2_resize(images):
  """EDM2's DINOv2Detector, resize_mode='torch': NHWC uint8 -> NCHW."""
  x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2)
  return torch.nn.functional.interpolate(
      x.to(torch.float32), size=(224, 224), mode='bicubic', antialias=True)


def edm2_normalize(x):
  x = x.to(torch.float32) / 255
  x = x - torch.tensor([0.485, 0.456, 0.406]).reshape(1, -1, 1, 1)
  return x / torch.tensor([0.229, 0.224, 0.225]).reshape(1, -1, 1, 1)


def _nhwc(x):
  return x.permute(0, 2, 3, 1).numpy()


def _rel(got, want):
  return float(np.max(np.abs(np.asarray(got) - np.asarray(want))) /
               np.max(np.abs(np.asarray(want))))


def test_pos_embed_interpolation_is_the_original(timm):
  """Measured (max error / max value): ours vs the original <= 2.7e-7;
  torch's size=16 vs the original's scale_factor 0.36; timm's resampling
  vs the original 0.85."""
  from timm.layers import resample_abs_pos_embed  # pylint: disable=g-import-not-at-top
  pos = torch.randn(1, 1 + 37 * 37, 32, generator=torch.Generator(
      ).manual_seed(1))
  for h, w in [(16, 16), (36, 36), (16, 20), (4, 4)]:
    want = original_pos_embed(pos, h, w)[0].numpy()
    got = dinov2.interpolate_pos_embed(pos[0].numpy(), (h, w))
    assert _rel(got, want) < 2e-6, (h, w)
    np.testing.assert_array_equal(got[0], pos[0, 0].numpy())
  # The checkpoint's own grid, square: used as it is.
  np.testing.assert_array_equal(
      dinov2.interpolate_pos_embed(pos[0].numpy(), (37, 37)), pos[0].numpy())

  # The original's scale factor is not the output size's: the claim checked.
  grid = pos[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
  by_scale = torch.nn.functional.interpolate(
      grid, scale_factor=(16.1 / 37, 16.1 / 37), mode='bicubic')
  by_size = torch.nn.functional.interpolate(grid, size=16, mode='bicubic')
  assert by_scale.shape == by_size.shape and _rel(by_size, by_scale) > .1
  # Nor is it what timm does for a 518 checkpoint at 224 (dynamic_img_size,
  # or loading with its checkpoint filter): size=(16, 16), antialiased.
  want = original_pos_embed(pos, 16, 16).numpy()
  timm_pos = resample_abs_pos_embed(pos, [16, 16], num_prefix_tokens=1)
  assert timm_pos.shape == want.shape and _rel(timm_pos, want) > .1


def _write_layouts(model, tmp_path):
  """The state dict as timm's model.safetensors, and as the original
  release's .pth (with its `mask_token`) and block-chunked .pth."""
  from safetensors import torch as st_torch  # pylint: disable=g-import-not-at-top
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  st_torch.save_file(state, tmp_path / 'model.safetensors')
  original = dict(state, mask_token=torch.zeros(1, TINY['embed_dim']))
  torch.save(original, tmp_path / 'original.pth')
  # block_chunks=1: every block in chunk 0, 'blocks.0.N.'.
  torch.save({re.sub(r'^blocks\.', 'blocks.0.', k): v
              for k, v in original.items()}, tmp_path / 'chunked.pth')
  return ['model.safetensors', 'original.pth', 'chunked.pth']


def test_features_match_timm_and_layouts_convert_alike(tmp_path, timm,
                                                        capsys):
  """Measured (max error / max value): features 4.4e-7 at 224 (through
  EDM2's preprocessing), 3.5e-7 at 518; timm's own resampling of the
  positions moves them by 1.7e-2."""
  model = _random_model(timm)
  digests = []
  for name in _write_layouts(model, tmp_path):
    out = tmp_path / f'{name}.npz'
    convert_dinov2.main([f'--weights={tmp_path / name}', f'--out={out}'])
    digests.append(capsys.readouterr().out.split('SHA-256 ')[1].split()[0])
    assert digests[-1] == weights_lib.sha256_of(out)
  # Byte for byte the same from every layout and format.
  assert len(set(digests)) == 1
  weights = dinov2.load_weights(str(tmp_path / 'original.pth.npz'),
                                digests[0])
  assert weights.config == dinov2.DINOv2Config(
      image_size=224, patch_size=14, embed_dim=128, depth=2, num_heads=2,
      mlp_ratio=3.0, pos_grid=37)

  # At 224 through EDM2's preprocessing, timm fed the original's positions.
  pos = model.pos_embed.detach()
  at_224 = timm.create_model('vit_large_patch14_dinov2', pretrained=False,
                             img_size=224, **TINY).eval()
  at_224.load_state_dict(dict(model.state_dict(),
                              pos_embed=original_pos_embed(pos, 16, 16)))
  images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3),
                                             dtype=np.uint8)
  x = edm2_normalize(edm2_resize(images))
  with torch.no_grad():
    want = at_224.forward_head(at_224.forward_features(x), pre_logits=True)
  got = jax.jit(dinov2.features_fn(weights.params, weights.config))(images)
  assert got.shape == (3, 128) and _rel(got, want) < 1e-5
  # With timm's resampling instead, they move measurably.
  from timm.layers import resample_abs_pos_embed  # pylint: disable=g-import-not-at-top
  at_224.load_state_dict(dict(model.state_dict(), pos_embed=(
      resample_abs_pos_embed(pos, [16, 16], num_prefix_tokens=1))))
  with torch.no_grad():
    resampled = at_224.forward_features(x)[:, 0]
  assert _rel(resampled, want) > 1e-3

  # At the checkpoint's 518, where the positions are used as they are.
  x = torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    want = model.forward_features(x)[:, 0]
  got = jax.jit(dinov2.DINOv2(weights.config).apply)(
      {'params': weights.params}, _nhwc(x))
  assert _rel(got, want) < 1e-5


def test_full_vit_l14_matches_timm_shapes(timm):
  """The default config is the original ViT-L/14: timm's
  vit_large_patch14_dinov2, built on the meta device (no memory), converts
  name by name and shape by shape, and the counts agree (304,367,616
  parameters; the original release adds its unused 1024-d mask_token)."""
  with torch.device('meta'):
    model = timm.create_model('vit_large_patch14_dinov2', pretrained=False)
  # Zero-stride stand-ins: the converter's reshapes and transposes are views.
  fake = {k: np.broadcast_to(np.float32(0), v.shape)
          for k, v in model.state_dict().items()}
  fake['mask_token'] = np.broadcast_to(np.float32(0), (1, 1024))
  config = convert_dinov2.config_from_state_dict(fake)
  assert config == dinov2.DINOv2Config()
  arrays = convert_dinov2.convert_state_dict(fake, config)  # Checks shapes.
  shapes = dinov2.param_shapes(config)
  assert weights_lib.shapes(arrays) == shapes
  assert sum(math.prod(s) for s in shapes.values()) == sum(
      p.numel() for p in model.parameters())


@pytest.mark.parametrize('size', [(8, 8), (64, 64), (300, 300), (512, 512),
                                  (224, 224), (40, 72)])
def test_preprocessing_matches_edm2_step_by_step(size):
  """Measured max errors: resize 1.4e-4 (8 -> 224), 1.2e-4 (64, 40x72),
  9.2e-5 (300, 512), 0 (224) in the [0, 255] scale, i.e. <= 6e-7
  relative; normalisation 2.4e-7; end to end 2.9e-6 (normalised units,
  values up to ~2.6). uint8 -> float32 is exact."""
  images = np.random.default_rng(size[0]).integers(
      0, 256, (2, *size, 3), dtype=np.uint8)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32)
  ours = np.asarray(dinov2.to_float(images))
  np.testing.assert_array_equal(ours, _nhwc(x))
  resized = edm2_resize(images)
  got = dinov2.resize(ours, 224)
  assert got.shape == (2, 224, 224, 3)
  assert np.max(np.abs(got - _nhwc(resized))) < 3e-4
  np.testing.assert_allclose(dinov2.normalize(_nhwc(resized)),
                             _nhwc(edm2_normalize(resized)), rtol=0,
                             atol=1e-6)
  np.testing.assert_allclose(dinov2.preprocess(images, 224),
                             _nhwc(edm2_normalize(resized)), rtol=0,
                             atol=6e-6)
  # A resize an antialias=False kernel (a = -0.75) would not pass.
  if size[0] < 224:
    plain = torch.nn.functional.interpolate(x, size=(224, 224),
                                            mode='bicubic')
    assert np.max(np.abs(_nhwc(plain) - _nhwc(resized))) > 1.


def test_bad_checkpoints_give_one_line_errors(tmp_path, timm):
  model = _random_model(timm)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  config = convert_dinov2.config_from_state_dict(state)
  bad_shape = dict(state, **{'blocks.1.attn.proj.weight':
                             state['blocks.1.attn.proj.weight'][1:]})
  cases = [
      (bad_shape, 'blocks_1/attn/proj/kernel'),
      ({k: v for k, v in state.items() if k != 'norm.bias'}, 'norm/bias'),
      (dict(state, **{'head.weight': np.zeros((10, 128))}), 'head.weight'),
      (dict(state, register_tokens=np.zeros((1, 4, 128))), 'register'),
      (dict(state, **{'blocks.0.mlp.w12.weight': np.zeros((4, 128))}),
       'SwiGLU'),
  ]
  for bad, needle in cases:
    with pytest.raises(weights_lib.WeightsError, match=re.escape(needle)
                       ) as e:
      convert_dinov2.convert_state_dict(bad, config)
    assert '\n' not in str(e.value)
  for bad, needle in [
      (dict(state, pos_embed=state['pos_embed'][:, :-1]), 'square'),
      ({k: v for k, v in state.items() if k != 'cls_token'}, 'cls_token')]:
    with pytest.raises(weights_lib.WeightsError, match=needle):
      convert_dinov2.config_from_state_dict(bad)

  # Damaged inputs, through the command line: one `error:` line each.
  _write_layouts(model, tmp_path)
  for name in ('original.pth', 'model.safetensors'):
    blob = (tmp_path / name).read_bytes()
    (tmp_path / f'cut_{name}').write_bytes(blob[:len(blob) // 2])
  torch.save([1, 2], tmp_path / 'list.pth')
  for name in ('cut_original.pth', 'cut_model.safetensors', 'list.pth',
               'none.pth'):
    with pytest.raises(SystemExit) as e:
      convert_dinov2.main([f'--weights={tmp_path / name}',
                           f'--out={tmp_path / "x.npz"}'])
    assert str(e.value).startswith('error: ') and '\n' not in str(e.value)
    assert name in str(e.value)

  # A converted file: wrong digest, tampered shape, no config, missing file.
  arrays = convert_dinov2.convert_state_dict(state, config)
  weights_lib.write_npz(tmp_path / 'noconfig.npz', arrays)
  arrays[weights_lib.CONFIG_KEY] = np.array([config.to_json()])
  weights_lib.write_npz(tmp_path / 'ok.npz', arrays)
  arrays['blocks_0/mlp/fc1/kernel'] = arrays['blocks_0/mlp/fc1/kernel'][:, 1:]
  weights_lib.write_npz(tmp_path / 'bad.npz', arrays)
  for path, sha, needle in [
      (tmp_path / 'ok.npz', '0' * 64, 'SHA-256'),
      (tmp_path / 'bad.npz', '', 'blocks_0/mlp/fc1/kernel'),
      (tmp_path / 'noconfig.npz', '', '__config__'),
      (tmp_path / 'none.npz', '', 'Cannot read')]:
    with pytest.raises(weights_lib.WeightsError, match=needle) as e:
      dinov2.load_weights(str(path), sha)
    assert '\n' not in str(e.value)

  assert dinov2.DINOv2Config.from_json(config.to_json()) == config
  for bad in [dict(image_size=225), dict(num_heads=3), dict(depth=0)]:
    with pytest.raises(weights_lib.WeightsError):
      dinov2.DINOv2Config(**bad)
