"""The ADM U-Net against diffusers' UNet2DModel, and its converter."""

import dataclasses
import hashlib
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from multistep_cm import adm
from multistep_cm import weights
from multistep_cm.tools import convert_adm
from multistep_cm.tools import convert_clip
from multistep_cm.tools import converting

torch = pytest.importorskip('torch')

# diffusers' scripts/convert_consistency_to_diffusers.py: OpenAI's ImageNet-64
# EDM teacher and CD/CT students (openai/diffusers-cd_imagenet64_l2, ...).
IMAGENET64 = dict(
    sample_size=64, in_channels=3, out_channels=3, layers_per_block=3,
    num_class_embeds=1000, block_out_channels=[192, 384, 576, 768],
    attention_head_dim=64,
    down_block_types=['ResnetDownsampleBlock2D', 'AttnDownBlock2D',
                      'AttnDownBlock2D', 'AttnDownBlock2D'],
    up_block_types=['AttnUpBlock2D', 'AttnUpBlock2D', 'AttnUpBlock2D',
                    'ResnetUpsampleBlock2D'],
    resnet_time_scale_shift='scale_shift', attn_norm_num_groups=32,
    upsample_type='resnet', downsample_type='resnet')
IMAGENET64_PARAMS = 295_899_267
# That network at a quarter of the resolution, a sixth of the width and a
# third of the depth: the same levels, multipliers and attention levels,
# 1-4 heads.
SMALL = adm.ADMConfig(image_size=16, model_channels=32, num_res_blocks=1,
                      attention_resolutions=(8, 4, 2), num_head_channels=32)
# The other options: unconditional, the embedding as a bias (LSUN's),
# convolutions resample, one head of any width, learned sigma.
OTHER = adm.ADMConfig(
    image_size=16, model_channels=32, channel_mult=(1, 1, 2),
    num_res_blocks=2, attention_resolutions=(4,), num_head_channels=-1,
    num_classes=0, dropout=0.1, resblock_updown=False,
    use_scale_shift_norm=False, out_channels=6)
# One level (residual and attention blocks, no resampling): for what is
# checked against the network itself.
TINY = adm.ADMConfig(image_size=8, model_channels=32, channel_mult=(1,),
                     num_res_blocks=1, attention_resolutions=(8,),
                     num_head_channels=32, num_classes=10, dropout=0.2)


def _unet2d():
  pytest.importorskip('diffusers')
  return convert_clip.past_cuda_torchvision(
      'diffusers', lambda: importlib.import_module('diffusers').UNet2DModel)


def _diffusers_kwargs(cfg, mid_attn_groups=32):
  """UNet2DModel's arguments for an ADMConfig, as diffusers' converter
  writes them."""
  attn = [cfg.has_attention(level) for level in range(len(cfg.channel_mult))]
  if cfg.resblock_updown:
    down, up = 'ResnetDownsampleBlock2D', 'ResnetUpsampleBlock2D'
  else:
    down, up = 'DownBlock2D', 'UpBlock2D'
  return dict(
      sample_size=cfg.image_size, in_channels=cfg.in_channels,
      out_channels=cfg.out_channels, layers_per_block=cfg.num_res_blocks,
      num_class_embeds=cfg.num_classes or None,
      block_out_channels=[cfg.width(level) for level in range(len(attn))],
      attention_head_dim=(cfg.num_head_channels
                          if cfg.num_head_channels > 0 else None),
      down_block_types=['AttnDownBlock2D' if a else down for a in attn],
      up_block_types=['AttnUpBlock2D' if a else up for a in reversed(attn)],
      resnet_time_scale_shift=('scale_shift' if cfg.use_scale_shift_norm
                               else 'default'),
      attn_norm_num_groups=mid_attn_groups, dropout=cfg.dropout,
      downsample_type='resnet' if cfg.resblock_updown else 'conv',
      upsample_type='resnet' if cfg.resblock_updown else 'conv')


def random_model(cfg, seed, **kwargs):
  """diffusers' model with every parameter perturbed: its initialisation
  leaves GroupNorms at 1 and 0, which would hide swaps of them."""
  model = _unet2d()(**_diffusers_kwargs(cfg, **kwargs))
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      scale = 0.2 if p.ndim == 1 else 0.5 * p.std()
      p.add_(scale * torch.randn(p.shape, generator=gen))
  return model.eval()


def _inputs(cfg, batch=2):
  rng = np.random.RandomState(0)
  x = rng.randn(batch, cfg.image_size, cfg.image_size,
                cfg.in_channels).astype(np.float32)
  # OpenAI's EDM time input, 250 ln sigma, at both ends of [0.002, 80].
  t = (250 * np.log(np.geomspace(0.002, 80, batch))).astype(np.float32)
  y = rng.randint(0, cfg.num_classes, batch) if cfg.num_classes else None
  return x, t, y


def _convert(model, directory, capsys):
  """Saves `model` as diffusers does, converts it on the command line;
  returns (.npz path, printed SHA-256)."""
  model.save_pretrained(directory / 'unet', safe_serialization=True)
  assert (directory / 'unet' / 'diffusion_pytorch_model.safetensors').exists()
  out = directory / 'adm.npz'
  convert_adm.main([f'--diffusers={directory}', f'--out={out}'])
  digest = capsys.readouterr().out.split('SHA-256 ')[1].strip()
  assert digest == hashlib.sha256(out.read_bytes()).hexdigest()
  return out, digest


def _check_parity(model, cfg, npz):
  config, params = adm.load_weights(npz)
  assert config == cfg
  x, t, y = _inputs(cfg)
  with torch.no_grad():
    want = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                 None if y is None else torch.from_numpy(y)).sample
  want = want.numpy().transpose(0, 2, 3, 1)
  got = jax.jit(adm.ADMUNet(config).apply)({'params': params}, x, t, y)
  assert got.dtype == jnp.float32 and got.shape == want.shape
  np.testing.assert_array_less(
      np.abs(np.asarray(got) - want).max(), 1e-5 * np.abs(want).max())


@pytest.fixture(scope='module')
def small(tmp_path_factory):
  """(diffusers model of SMALL, its converted .npz, its SHA-256)."""
  directory = tmp_path_factory.mktemp('small')
  model = random_model(SMALL, seed=0)
  model.save_pretrained(directory / 'unet', safe_serialization=True)
  out = directory / 'adm.npz'
  config, digest = convert_adm.convert_diffusers(directory, out)
  assert config == SMALL
  return model, out, digest


def test_imagenet64_layout_matches_diffusers():
  with torch.device('meta'):
    model = _unet2d()(**IMAGENET64)
  config = convert_adm.config_from_diffusers(dict(model.config), 'meta')
  preset = convert_adm.config_from_openai(convert_adm.PRESETS['openai_imagenet64'])
  assert config == preset == adm.ADMConfig()
  # Zero-stride arrays: every name and shape, without 1.2 GB of weights.
  state = {k: np.broadcast_to(np.float32(0), v.shape)
           for k, v in model.state_dict().items()}
  arrays = convert_adm.convert_state_dict(state, config, 'diffusers', 'meta')
  shapes = adm.param_shapes(config)
  assert {k: a.shape for k, a in arrays.items()} == shapes
  count = sum(p.numel() for p in model.parameters())
  assert sum(math.prod(s) for s in shapes.values()) == count
  assert count == IMAGENET64_PARAMS


def test_class_conditional_matches_diffusers(small):
  model, npz, _ = small
  _check_parity(model, SMALL, npz)


def test_other_options_match_diffusers(tmp_path, capsys):
  # Without attn_norm_num_groups the middle attention of a 'default' model
  # still has its GroupNorm.
  model = random_model(OTHER, seed=1, mid_attn_groups=None)
  npz, _ = _convert(model, tmp_path, capsys)
  _check_parity(model, OTHER, npz)


def _openai_names(cfg):
  """diffusers' module prefixes -> OpenAI's, as UNetModel.__init__ numbers
  its input_blocks and output_blocks."""
  names = {'time_embedding.linear_1': 'time_embed.0',
           'time_embedding.linear_2': 'time_embed.2',
           'class_embedding': 'label_emb', 'conv_in': 'input_blocks.0.0',
           'mid_block.resnets.0': 'middle_block.0',
           'mid_block.attentions.0': 'middle_block.1',
           'mid_block.resnets.1': 'middle_block.2',
           'conv_norm_out': 'out.0', 'conv_out': 'out.2'}
  levels, blocks = len(cfg.channel_mult), 1
  for level in range(levels):
    for j in range(cfg.num_res_blocks):
      names[f'down_blocks.{level}.resnets.{j}'] = f'input_blocks.{blocks}.0'
      names[f'down_blocks.{level}.attentions.{j}'] = f'input_blocks.{blocks}.1'
      blocks += 1
    if level != levels - 1:
      names[f'down_blocks.{level}.downsamplers.0'] = f'input_blocks.{blocks}.0'
      blocks += 1
  blocks = 0
  for i, level in enumerate(reversed(range(levels))):
    for j in range(cfg.num_res_blocks + 1):
      names[f'up_blocks.{i}.resnets.{j}'] = f'output_blocks.{blocks}.0'
      names[f'up_blocks.{i}.attentions.{j}'] = f'output_blocks.{blocks}.1'
      blocks += 1
    names[f'up_blocks.{i}.upsamplers.0'] = (
        f'output_blocks.{blocks - 1}.{2 if cfg.has_attention(level) else 1}')
  return names


_OPENAI_LEAVES = {'norm1': 'in_layers.0', 'conv1': 'in_layers.2',
                  'time_emb_proj': 'emb_layers.1', 'norm2': 'out_layers.0',
                  'conv2': 'out_layers.3', 'conv_shortcut': 'skip_connection',
                  'group_norm': 'norm', 'to_out.0': 'proj_out'}


def openai_state_dict(state, cfg, heads_first=False):
  """A diffusers state dict in consistency_models' names and layouts:
  attention's 1x1 Conv1d projections, q, k and v in one qkv (split by heads
  first if `heads_first`, as guided-diffusion's legacy order)."""
  names, out, qkv = _openai_names(cfg), {}, {}
  for key, value in state.items():
    prefix = max((p for p in names if key.startswith(p + '.')), key=len)
    module, _, leaf = key[len(prefix) + 1:].rpartition('.')
    new = names[prefix]
    if module in ('to_q', 'to_k', 'to_v'):
      qkv.setdefault((new, leaf), {})[module] = value
      continue
    if module:
      new += '.' + _OPENAI_LEAVES[module]
    if module == 'to_out.0' and leaf == 'weight':
      value = value[..., None]
    out[f'{new}.{leaf}'] = value
  for (new, leaf), parts in qkv.items():
    value = torch.cat([parts['to_q'], parts['to_k'], parts['to_v']])
    if heads_first:
      heads = cfg.heads(value.shape[0] // 3)
      value = value.reshape(3, heads, -1, *value.shape[1:]).transpose(0, 1)
      value = value.reshape(-1, *value.shape[3:])
    out[f'{new}.qkv.{leaf}'] = value[..., None] if leaf == 'weight' else value
  return out


@pytest.mark.parametrize('legacy', [False, True])
def test_openai_checkpoint_converts_as_diffusers(small, tmp_path, capsys,
                                                 legacy):
  model, npz, digest = small
  state = openai_state_dict(model.state_dict(), SMALL, heads_first=legacy)
  assert {'input_blocks.3.1.qkv.weight',
          'output_blocks.1.2.in_layers.0.weight'} <= set(state)
  torch.save(state, tmp_path / 'model.pt')
  out = tmp_path / 'adm.npz'
  convert_adm.main(
      [f'--openai={tmp_path / "model.pt"}', '--preset=openai_imagenet64',
       '--image_size=16', '--num_channels=32', '--channel_mult=1,2,3,4',
       '--num_res_blocks=1', '--attention_resolutions=8,4,2',
       '--num_head_channels=32', f'--out={out}']
      + ['--legacy_attention_order'] * legacy)
  assert capsys.readouterr().out.split('SHA-256 ')[1].strip() == digest
  with np.load(out) as got, np.load(npz) as want:
    assert sorted(got.files) == sorted(want.files)
    for name in want.files:
      np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def _error(fn, *args):
  with pytest.raises(weights.WeightsError) as e:
    fn(*args)
  assert '\n' not in str(e.value)
  return str(e.value)


def test_one_line_errors(small, tmp_path):
  model, npz, _ = small
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  convert = lambda s: convert_adm.convert_state_dict(s, SMALL, 'diffusers',
                                                     'w')
  key = 'down_blocks.2.attentions.0.to_k.weight'
  assert f'no {key!r}' in _error(convert, {k: v for k, v in state.items()
                                           if k != key})
  key = 'up_blocks.0.resnets.1.conv_shortcut.weight'
  assert f'{key!r} has shape (7,)' in _error(
      convert, {**state, key: np.zeros(7, np.float32)})
  assert "unexpected tensor 'extra'" in _error(
      convert, {**state, 'extra': np.zeros(1)})

  cfg = dict(model.config)
  assert 'norm_eps=1e-06' in _error(convert_adm.config_from_diffusers,
                                    {**cfg, 'norm_eps': 1e-6}, 'c')
  (tmp_path / 'unet').mkdir()
  (tmp_path / 'unet' / 'config.json').write_text(
      model.to_json_string().replace('"scale_shift"', '"ada_group"'))
  with pytest.raises(SystemExit) as e:
    convert_adm.main([f'--diffusers={tmp_path / "unet"}',
                      f'--out={tmp_path / "x.npz"}'])
  assert str(e.value).startswith('error: ') and '\n' not in str(e.value)
  assert "resnet_time_scale_shift='ada_group'" in str(e.value)

  (tmp_path / 'text.pt').write_text('not a checkpoint')
  assert 'not a torch state dict' in _error(
      converting.read_state_dict, tmp_path / 'text.pt')
  torch.save([torch.zeros(2)], tmp_path / 'list.pt')
  assert 'not a state dict' in _error(
      converting.read_state_dict, tmp_path / 'list.pt')

  with np.load(npz) as f:
    arrays = {k: f[k] for k in f.files}
  arrays['mid_attn_0/query/kernel'] = arrays['mid_attn_0/query/kernel'].T[:1]
  weights.write_npz(tmp_path / 'bad.npz', arrays)
  assert 'mid_attn_0/query/kernel: (1, 128) instead of (128, 128)' in _error(
      adm.load_weights, tmp_path / 'bad.npz')


def _random_params(cfg):
  """Parameters of the shapes of the network's own `init`, without running
  its initialisers (slow to compile on CPU)."""
  rng = np.random.RandomState(0)
  def init(name, shape):
    if name.endswith(('kernel', 'embedding')):
      return rng.randn(*shape) / math.sqrt(math.prod(shape[:-1]))
    return (name.endswith('scale') + 0.2 * rng.randn(*shape))
  return weights.unflatten({k: jnp.asarray(init(k, s), jnp.float32)
                            for k, s in adm.param_shapes(cfg).items()})


def _training_output(cfg, x, t, y):
  """Jitted `(params, dropout rng) -> output` in training mode: dropout on,
  and blocks rematerialised as a backward pass would recompute them.
  (Evaluation mode, without dropout, is that of the parity tests.)"""
  return jax.jit(lambda p, rng: adm.ADMUNet(cfg).apply(
      {'params': p}, x, t, y, train=True, rngs={'dropout': rng}))


@pytest.fixture(scope='module')
def tiny():
  """(params, inputs, output in float32 without remat, its function)."""
  params, inputs = _random_params(TINY), _inputs(TINY)
  fn = _training_output(TINY, *inputs)
  return params, inputs, fn(params, jax.random.key(1)), fn


def test_bfloat16_computes_with_float32_parameters(tiny):
  params, inputs, want, _ = tiny
  bf16 = dataclasses.replace(TINY, dtype='bfloat16')
  abstract = jax.eval_shape(adm.ADMUNet(bf16).init, jax.random.key(0),
                            *inputs)
  assert {p.dtype for p in jax.tree.leaves(abstract)} == {jnp.dtype('float32')}
  got = _training_output(bf16, *inputs)(params, jax.random.key(1))
  assert got.dtype == jnp.float32 and np.isfinite(got).all()
  err = float(jnp.abs(got - want).max() / jnp.abs(want).max())
  assert 0 < err < 0.05  # Computed in bfloat16 indeed, and close.


def test_remat_and_sharded_parameters_keep_values(tiny):
  params, inputs, want, fn = tiny
  remat = dataclasses.replace(TINY, remat='full')
  remat_fn = _training_output(remat, *inputs)
  assert 'remat' in str(jax.make_jaxpr(remat_fn)(params, jax.random.key(1)))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ('model',))
  spec = lambda p: jax.sharding.PartitionSpec(
      *[None] * (p.ndim - 1), 'model' if p.shape[-1] % 2 == 0 else None)
  sharded = jax.device_put(params, jax.tree.map(
      lambda p: jax.sharding.NamedSharding(mesh, spec(p)), params))
  got = remat_fn(sharded, jax.random.key(1))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Dropout is on: another rng, another output.
  assert not np.allclose(fn(params, jax.random.key(2)), want, rtol=1e-3,
                         atol=1e-3)
