"""The ADM U-Net of guided-diffusion and consistency_models, in Flax Linen.

OpenAI's ImageNet-64 EDM teacher and its consistency-distilled and -trained
students are this network (`ADMConfig()`), as are the other published models
of the family, by config: residual blocks conditioned on a time (and class)
embedding by scale and shift of their second GroupNorm, or by an added bias;
up- and down-sampling by residual blocks or by convolutions; self-attention
at chosen resolutions; skip connections concatenated on the way up.

It computes what diffusers' `UNet2DModel` computes for the same weights (and
OpenAI's `UNetModel`). `tools/convert_adm.py` converts either's weights to
an .npz of `FORMAT`. Parameters are float32; `dtype` is the
compute dtype. Inputs and outputs are NHWC.

`Network` is the same U-Net as this framework's `(z_t, t, cond) -> v`
network: a Karras-form denoiser (`karras.py`) over a logSNR schedule, its
parameters under `unet`. The U-Net's blocks differ in width from one to the
next, so unlike the UViT's middle stack there is nothing to scan.
"""

import dataclasses
import functools
import json
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from multistep_cm import conditioning
from multistep_cm import karras
from multistep_cm import models
from multistep_cm import weights

UNET = 'unet'  # Where `Network` holds the U-Net's parameters.
GROUPS = 32  # Every GroupNorm's, as in OpenAI's `normalization`.
EPS = 1e-5  # torch's GroupNorm epsilon, OpenAI's and diffusers' default.

@dataclasses.dataclass(frozen=True)
class ADMConfig:
  """Hyper-parameters, in OpenAI's terms; the defaults are the ImageNet-64
  EDM teacher and its CD/CT students."""
  image_size: int = 64
  in_channels: int = 3
  out_channels: int = 3  # 6 for models that learn sigma.
  model_channels: int = 192
  # Width of each level is int(mult * model_channels); a level runs at
  # image_size // 2**level.
  channel_mult: Sequence[float] = (1, 2, 3, 4)
  num_res_blocks: int = 3
  # Resolutions (in pixels, for inputs of image_size) that have attention.
  attention_resolutions: Sequence[int] = (32, 16, 8)
  # Channels per attention head; if -1, `num_heads` heads at every width.
  num_head_channels: int = 64
  num_heads: int = 1
  num_classes: int = 1000  # 0: unconditional.
  # One more label-embedding row, the null class of classifier-free guidance
  # (label num_classes). OpenAI's models have none: they cannot be guided.
  null_class: bool = False
  dropout: float = 0.
  resblock_updown: bool = True  # Else convolutions resample.
  use_scale_shift_norm: bool = True  # Else the embedding is a bias.
  dtype: str = 'float32'
  norm_float32: bool = True  # GroupNorm statistics in float32.
  remat: str = 'none'  # Blocks recomputed in the backward pass: models.REMAT.
  attention: str = 'auto'  # See models.attention_implementation.

  def __post_init__(self):
    if self.dtype not in ('float32', 'bfloat16'):
      raise ValueError(
          f'ADM dtype {self.dtype!r}: expected float32 or bfloat16.')
    if self.remat not in models.REMAT:
      raise ValueError(f'ADM remat {self.remat!r}: expected one of '
                               f'{", ".join(models.REMAT)}.')
    for level in range(len(self.channel_mult)):
      if self.has_attention(level):
        self.heads(self.width(level))  # Raises for an unfit head count.

  def width(self, level):
    return int(self.channel_mult[level] * self.model_channels)

  def has_attention(self, level):
    return self.image_size // 2**level in self.attention_resolutions

  def heads(self, channels):
    heads = (channels // self.num_head_channels if self.num_head_channels > 0
             else self.num_heads)
    if heads < 1 or channels % heads:
      raise ValueError(
          f'ADM attention at width {channels} cannot have '
          f'{self.num_head_channels} channels per head / {heads} heads.')
    return heads

  def to_json(self):
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_json(cls, text):
    fields = json.loads(text)
    for key in ('channel_mult', 'attention_resolutions'):
      fields[key] = tuple(fields[key])
    return cls(**fields)


def timestep_embedding(t, dim, max_period=10_000.):
  """OpenAI's sinusoidal features of t as given (cosines first), diffusers'
  `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) *
                  jnp.arange(half, dtype=jnp.float32) / half)
  args = t[:, None].astype(jnp.float32) * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def _conv(features, kernel, dtype, name, strides=1):
  # torch's padding: a 'SAME' stride-2 conv would pad only after.
  return nn.Conv(features, (kernel, kernel), strides=strides,
                 padding=kernel // 2, dtype=dtype, name=name)


def _norm(dtype, norm_float32, name):
  # torch's two-pass variance; flax defaults to E[x²] - E[x]².
  return nn.GroupNorm(GROUPS, epsilon=EPS, use_fast_variance=False,
                      dtype=dtype, force_float32_reductions=norm_float32,
                      name=name)


def _upsample(x):
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _downsample(x):
  return nn.avg_pool(x, (2, 2), (2, 2))


class ResBlock(nn.Module):
  """OpenAI's ResBlock, diffusers' ResnetBlock2D; `resample` 'up' or 'down'
  makes it a resampling block. `emb` is the float32 embedding after its
  SiLU."""
  channels: int
  dropout: float
  scale_shift: bool
  dtype: jnp.dtype
  norm_float32: bool = True
  resample: str = 'none'

  @nn.compact
  def __call__(self, x, emb, train):
    h = nn.silu(_norm(self.dtype, self.norm_float32, 'norm_1')(x))
    if self.resample != 'none':
      resample = _upsample if self.resample == 'up' else _downsample
      h, x = resample(h), resample(x)
    h = _conv(self.channels, 3, self.dtype, 'conv_1')(h)
    width = 2 * self.channels if self.scale_shift else self.channels
    e = nn.Dense(width, dtype=jnp.float32, name='emb_proj')(emb)
    e = e.astype(self.dtype)[:, None, None]
    norm_2 = _norm(self.dtype, self.norm_float32, 'norm_2')
    if self.scale_shift:
      scale, shift = jnp.split(e, 2, axis=-1)
      h = norm_2(h) * (1 + scale) + shift
    else:
      h = norm_2(h + e)
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    h = _conv(self.channels, 3, self.dtype, 'conv_2')(h)
    if x.shape[-1] != self.channels:
      x = _conv(self.channels, 1, self.dtype, 'skip')(x)
    return x + h


class AttentionBlock(nn.Module):
  """Self-attention over all positions, with a residual connection."""
  heads: int
  dtype: jnp.dtype
  norm_float32: bool = True
  attention: str = 'xla'  # A resolved implementation: xla, cudnn, splash.

  @nn.compact
  def __call__(self, x):
    b, hh, ww, c = x.shape
    h = _norm(self.dtype, self.norm_float32, 'norm')(x).reshape(b, hh * ww, c)

    def project(name):  # To (batch, positions, heads, head channels).
      return nn.Dense(c, dtype=self.dtype, name=name)(h).reshape(
          b, hh * ww, self.heads, c // self.heads)

    h = models.dot_product_attention(project('query'), project('key'),
                                     project('value'), self.attention)
    h = nn.Dense(c, dtype=self.dtype, name='out')(h.reshape(b, hh * ww, c))
    return x + h.reshape(x.shape)


class ADMUNet(nn.Module):
  """`(x, noise_input, class_labels, train) -> output`, all NHWC.
  `noise_input` (B,) is what the sinusoidal embedding sees, diffusers'
  `timestep` (OpenAI's EDM feeds 250 ln sigma); `class_labels` (B,) ints,
  for class-conditional configs only. Output float32, out_channels."""
  config: ADMConfig

  @nn.compact
  def __call__(self, x, noise_input, class_labels=None, train=False,
               extra_emb=None):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    if (class_labels is not None) != bool(cfg.num_classes):
      raise ValueError('class_labels must be given exactly when the config is '
                       f'class-conditional (num_classes={cfg.num_classes}).')
    t = jnp.broadcast_to(jnp.asarray(noise_input, jnp.float32), x.shape[:1])
    # The embedding path is float32 whatever the dtype, as in OpenAI's fp16
    # models: it costs little, and keeps the time conditioning precise.
    emb_dim = 4 * cfg.model_channels
    emb = timestep_embedding(t, cfg.model_channels)
    emb = nn.Dense(emb_dim, name='time_embed_1')(emb)
    emb = nn.Dense(emb_dim, name='time_embed_2')(nn.silu(emb))
    if cfg.num_classes:
      emb += conditioning.Embed(cfg.num_classes + cfg.null_class, emb_dim,
                                name='label_embed')(class_labels)
    if extra_emb is not None:  # An any-S student's boundary embedding.
      emb += extra_emb
    # Every block's embedding projection starts with this SiLU.
    emb = nn.silu(emb)

    res = functools.partial(self._res, emb=emb, train=train)
    h = _conv(cfg.width(0), 3, dtype, 'conv_in')(x.astype(dtype))
    skips = [h]
    levels = len(cfg.channel_mult)
    for level in range(levels):
      for j in range(cfg.num_res_blocks):
        h = res(h, cfg.width(level), f'down_{level}_res_{j}')
        if cfg.has_attention(level):
          h = self._attention(h, f'down_{level}_attn_{j}')
        skips.append(h)
      if level < levels - 1:
        name = f'down_{level}_downsample'
        h = (res(h, h.shape[-1], name, 'down') if cfg.resblock_updown else
             _conv(h.shape[-1], 3, dtype, name, strides=2)(h))
        skips.append(h)

    h = res(h, h.shape[-1], 'mid_res_0')
    h = self._attention(h, 'mid_attn_0')
    h = res(h, h.shape[-1], 'mid_res_1')

    for level in reversed(range(levels)):
      for j in range(cfg.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res(h, cfg.width(level), f'up_{level}_res_{j}')
        if cfg.has_attention(level):
          h = self._attention(h, f'up_{level}_attn_{j}')
      if level:
        name = f'up_{level}_upsample'
        h = (res(h, h.shape[-1], name, 'up') if cfg.resblock_updown else
             _conv(h.shape[-1], 3, dtype, name)(_upsample(h)))

    h = nn.silu(_norm(dtype, cfg.norm_float32, 'norm_out')(h))
    return _conv(cfg.out_channels, 3, dtype, 'conv_out')(h).astype(jnp.float32)

  def _res(self, h, channels, name, resample='none', *, emb, train):
    cfg = self.config
    block = _remat(ResBlock, cfg, static_argnums=(3,))(
        channels, cfg.dropout, cfg.use_scale_shift_norm, jnp.dtype(cfg.dtype),
        cfg.norm_float32, resample, name=name)
    return block(h, emb, train)

  def _attention(self, h, name):
    cfg = self.config
    heads = cfg.heads(h.shape[-1])
    implementation = models.attention_implementation(
        cfg.attention, cfg.dtype, h.shape[-1] // heads)
    block = _remat(AttentionBlock, cfg)(
        heads, jnp.dtype(cfg.dtype), cfg.norm_float32, implementation,
        name=name)
    return block(h)


def _remat(cls, cfg, static_argnums=()):
  """`cls`, rematerialised if cfg.remat says so; its parameters keep their
  names."""
  if cfg.remat == 'none':
    return cls
  return nn.remat(cls, policy=models.REMAT[cfg.remat],
                  static_argnums=static_argnums)


@functools.lru_cache(maxsize=8)
def param_shapes(config):
  """{'down_0_res_0/conv_1/kernel': shape, ...} of the network for
  `config`, traced abstractly (no computation). Not to be modified."""
  x = jnp.zeros((1, config.image_size, config.image_size, config.in_channels))
  labels = jnp.zeros((1,), jnp.int32) if config.num_classes else None
  abstract = jax.eval_shape(ADMUNet(config).init, jax.random.key(0), x,
                            jnp.zeros((1,)), labels)['params']
  flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
  return {'/'.join(k.key for k in path): tuple(leaf.shape)
          for path, leaf in flat}


FORMAT = weights.Format(
    what='ADM weights',
    how_to_get=(
        'Convert a diffusers UNet2DModel or an OpenAI .pt once, on a machine '
        'with torch: `python -m multistep_cm.tools.convert_adm '
        '--diffusers=<dir> --out=adm.npz` or `... --openai=<model.pt> '
        '--preset=openai_imagenet64 --out=adm.npz`.'),
    converter='convert_adm', param_shapes=param_shapes, config_type=ADMConfig,
    where='does not match the ADM config')


def load_weights(path, sha256=''):
  """(ADMConfig, params) of a `convert_adm` .npz (local or gs://), its
  SHA-256 checked when one is given."""
  loaded = FORMAT.load(path, sha256)
  return loaded.config, loaded.params


class Network(nn.Module):
  """The ADM U-Net as this framework's network: `(z_t, t, cond, train) -> v`
  over the logSNR schedule `logsnr_fn`, through the Karras-form denoiser
  D = c_skip x + c_out F(c_in x, time) of `preconditioning` ('edm' for
  diffusion models, 'consistency' for OpenAI's CD/CT students) and
  `time_input` ('openai': 250 ln sigma, or 'edm': ln(sigma) / 4). An any-S
  student also takes `boundary` (models.BoundaryEmbedding), added to the
  U-Net's time embedding."""
  config: ADMConfig
  condition: conditioning.Condition
  logsnr_fn: Callable
  preconditioning: str = 'edm'
  time_input: str = 'openai'

  @property
  def has_null_condition(self):
    """Whether classifier-free guidance (and training its null) works."""
    return self.config.null_class or not self.condition.conditional

  @nn.compact
  def __call__(self, z, t, cond, train=False, boundary=None):
    unet = ADMUNet(self.config, name=UNET)
    labels = cond if self.condition.conditional else None
    # Beside the U-Net, so that its imported weights keep their names; in
    # float32, like the U-Net's own embedding path.
    extra = models.boundary_embedding(boundary, z.shape[0],
                                      4 * self.config.model_channels,
                                      jnp.float32)
    denoiser = karras.denoiser(
        lambda _, x, time, c, __: unet(x, time, c, train, extra),
        karras.SCALINGS[self.preconditioning], self.time_input)
    return karras.v_network(denoiser, self.logsnr_fn)(None, z, t, labels)
