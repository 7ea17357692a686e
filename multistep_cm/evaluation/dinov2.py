"""DINOv2 image features, for the Frechet distance in DINOv2 feature space
(FD-DINOv2, as EDM2 reports it beside FID).

The network is the original release's ViT (`dinov2_vitl14` of torch.hub's
facebookresearch/dinov2, timm's `vit_large_patch14_dinov2`): a 14x14 conv
patch embedding with bias, class token, learned absolute positions for the
checkpoint's 37x37 grid (518 / 14) plus the class position, pre-LN blocks
with LayerScale after attention and after the exact-GELU MLP, LayerNorms
with eps 1e-6, no register tokens. Features are the class token after the
final norm (the original's `x_norm_clstoken`, what the hub model returns,
its head being the identity): 1024-d for ViT-L/14.

Input preparation is EDM2's DINOv2 detector (`calculate_metrics.py`, its
default resize_mode='torch'): the uint8 images as float32 are resized to
224x224 with torch's `interpolate(mode='bicubic', antialias=True)`, then
divided by 255 and normalised with ImageNet's mean and std. At 224x224 the
network sees a 16x16 patch grid, and the 37x37 position embedding is
resampled as the original `interpolate_pos_encoding` does it, which is not
what timm does (see `interpolate_pos_embed`).

Both resizes are matmuls with weight matrices built here to reproduce
torch's kernels, its float32 coordinate arithmetic included, so the same
function serves any size on any backend. Every matmul and convolution runs
at HIGHEST precision and everything in float32: bf16/TF32 passes move the
features more than any port-to-port difference.

Weights are a `.npz` written by `convert_dinov2`: float32 arrays named like
the parameters here ('blocks_0/attn/qkv/kernel'), plus the `DINOv2Config` as
JSON under '__config__', so the file alone rebuilds the network.
"""

import dataclasses
import functools
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from multistep_cm import weights

HIGHEST = jax.lax.Precision.HIGHEST
# ImageNet's statistics, EDM2's constants (and timm's IMAGENET_DEFAULT_*).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# The original's `interpolate_offset`, a historical kludge (dino issue #8)
# kept for backward compatibility: it changes the resampling, see below.
INTERPOLATE_OFFSET = 0.1
# For the evaluation record: what `features_fn` does to images (sizes of the
# default ViT-L/14 config).
PREPROCESSING = (
    'uint8 -> float32 -> torch\'s bicubic antialiased resize to 224 (EDM2\'s '
    'DINOv2 detector) -> / 255 -> ImageNet mean/std; 37x37 position '
    'embedding resampled as the original DINOv2 (scale (16 + 0.1) / 37)')


@dataclasses.dataclass(frozen=True)
class DINOv2Config:
  """Hyperparameters that shape the network; defaults: the original
  release's ViT-L/14, fed 224x224 images as EDM2's FD-DINOv2."""
  image_size: int = 224  # Every image is resized to this, square.
  patch_size: int = 14
  embed_dim: int = 1024
  depth: int = 24
  num_heads: int = 16
  mlp_ratio: float = 4.0
  pos_grid: int = 37  # Of the checkpoint's position embedding: 518 / 14.

  def __post_init__(self):
    ints = (self.image_size, self.patch_size, self.embed_dim, self.depth,
            self.num_heads, self.pos_grid)
    if min(ints) < 1 or self.mlp_ratio <= 0:
      raise weights.WeightsError(f'Non-positive size in {self}.')
    if self.image_size % self.patch_size:
      raise weights.WeightsError(
          f'image_size {self.image_size} is not a multiple of patch_size '
          f'{self.patch_size}, as the original network requires.')
    if self.embed_dim % self.num_heads:
      raise weights.WeightsError(
          f'embed_dim {self.embed_dim} does not split into {self.num_heads} '
          'heads.')

  @property
  def mlp_hidden(self):
    return int(self.embed_dim * self.mlp_ratio)  # As torch's Block.

  def to_json(self):
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_json(cls, text):
    return cls(**json.loads(text))


# ----------------------------------------------------------------------------
# torch's bicubic kernels as matrices.
# ----------------------------------------------------------------------------
# torch computes resampling coordinates and weights in float32 (on CPU and in
# its CUDA kernels alike), its compilers fusing a * b + c into one rounding
# (FMA). Doing the same here, cast for cast, puts these weights within
# ~1e-7 of torch's instead of ~2e-6 (float32 source positions near 36 are
# off by ~2e-6 pixels, and the polynomials' roundings add as much).

_F32 = np.float32


def _fma(a, b, c):
  """a * b + c in float32 with one rounding: the float64 product of two
  float32 numbers is exact."""
  return (np.float64(a) * np.float64(b) + np.float64(c)).astype(_F32)


def _cubic1(x, a):
  """Keys' cubic for |x| <= 1, as torch's `cubic_convolution1`."""
  return _fma(x * _fma(a + _F32(2), x, -(a + _F32(3))), x, _F32(1))


def _cubic2(x, a):
  """Keys' cubic for 1 < |x| < 2, as torch's `cubic_convolution2`."""
  return _fma(_fma(_fma(a, x, -_F32(5) * a), x, _F32(8) * a), x,
              -_F32(4) * a)


@functools.lru_cache(maxsize=None)
def bicubic_matrix(n_in, n_out, scale_factor=None):
  """(n_out, n_in) float32 weights of torch's bicubic `interpolate` without
  antialiasing (align_corners=False), along one axis.

  Keys' cubic with a = -0.75; output i samples input position
  (i + 0.5) * s - 0.5 with s = 1 / scale_factor when one is given (torch
  keeps it, it does not recompute it from the sizes), n_in / n_out
  otherwise; the four taps' indices are clamped into the input, so the
  border pixel takes the weight of the taps beyond it.
  """
  scale = (_F32(1. / scale_factor) if scale_factor
           else _F32(n_in) / _F32(n_out))
  src = _fma(scale, np.arange(n_out, dtype=_F32) + _F32(.5), _F32(-.5))
  index = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  t = np.clip(src - index.astype(_F32), _F32(0), _F32(1))
  a = _F32(-.75)
  coeffs = [_cubic2(t + _F32(1), a), _cubic1(t, a), _cubic1(_F32(1) - t, a),
            _cubic2(_F32(1) - t + _F32(1), a)]
  m = np.zeros((n_out, n_in), np.float64)
  for k, c in enumerate(coeffs):
    np.add.at(m, (np.arange(n_out), np.clip(index - 1 + k, 0, n_in - 1)), c)
  return m.astype(_F32)


@functools.lru_cache(maxsize=None)
def antialiased_bicubic_matrix(n_in, n_out):
  """(n_out, n_in) float32 weights of torch's bicubic `interpolate` with
  antialias=True (`size=` given), along one axis: PIL's filter.

  Keys' cubic with a = -0.5 (not the -0.75 of antialias=False), stretched
  by n_in / n_out when shrinking, centred on input position
  (i + 0.5) * n_in / n_out - 0.5, over the taps inside the input only,
  normalised to sum to 1 (no border clamping).
  """
  scale = _F32(n_in) / _F32(n_out)
  support = _F32(2. * scale) if scale >= 1 else _F32(2)
  invscale = _F32(1. / scale) if scale >= 1 else _F32(1)
  # Where torch mixes float and double, the sum is a double: hence the casts.
  center = (np.float64(scale) * (np.arange(n_out) + .5)).astype(_F32)
  lo = np.maximum(((center - support).astype(np.float64) + .5).astype(
      np.int64), 0)
  hi = np.minimum(((center + support).astype(np.float64) + .5).astype(
      np.int64), n_in)
  taps = np.arange(n_in)
  x = np.abs(((taps[None].astype(_F32) - center[:, None]).astype(np.float64)
              + .5) * np.float64(invscale)).astype(_F32)
  a = _F32(-.5)
  w = np.where(x < 1, _cubic1(x, a), np.where(x < 2, _cubic2(x, a), _F32(0)))
  w = np.where((taps >= lo[:, None]) & (taps < hi[:, None]), w, _F32(0))
  return (w / np.sum(w, axis=1, keepdims=True, dtype=_F32)).astype(_F32)


def _resample(x, rows, cols):
  """x (N, H, W, C) resampled by (H', H) and (W', W) matrices (or None)."""
  if rows is not None:
    x = jnp.einsum('oh,nhwc->nowc', rows, x, precision=HIGHEST)
  if cols is not None:
    x = jnp.einsum('pw,nowc->nopc', cols, x, precision=HIGHEST)
  return x


def interpolate_pos_embed(pos_embed, grid):
  """(1 + M*M, D) position embedding of an MxM grid -> (1 + h*w, D) for an
  (h, w) patch grid, as the original `interpolate_pos_encoding`.

  The original asks torch for bicubic (a = -0.75, no antialiasing) with
  scale_factor=((h + 0.1) / M, (w + 0.1) / M): the output is h x w, but
  torch samples position (i + 0.5) * M / (h + 0.1) - 0.5, not
  (i + 0.5) * M / h - 0.5. At 224 pixels (h = w = 16 from M = 37), on a
  random embedding, the two differ by ~1/3 of its largest value, and
  timm's `resample_abs_pos_embed` (size=(h, w), antialiased by default) by
  more. Only the checkpoint's own grid, with a square input, is used as it
  is.

  The resampling happens here, in the network, from constant matrices built
  at trace time, not once at load time: the weights file keeps the
  checkpoint's own grid (the release's names and shapes, one file for any
  input size), and two (16, 37) matmuls cost nothing next to one block.
  """
  m = math.isqrt(pos_embed.shape[0] - 1)
  h, w = grid
  if h == w == m:  # The original returns its embedding as it is.
    return pos_embed
  patches = pos_embed[1:].reshape(1, m, m, -1).astype(jnp.float32)
  patches = _resample(
      patches,
      bicubic_matrix(m, h, (h + INTERPOLATE_OFFSET) / m),
      bicubic_matrix(m, w, (w + INTERPOLATE_OFFSET) / m))
  return jnp.concatenate([pos_embed[:1], patches.reshape(h * w, -1)], 0)


# ----------------------------------------------------------------------------
# The network.
# ----------------------------------------------------------------------------


def _layer_norm(name):
  # DINOv2's eps and torch's two-pass variance (flax's default is E[x²]-E[x]²).
  return nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, name=name)


def _dense(features, name):
  return nn.Dense(features, precision=HIGHEST, name=name)


class Attention(nn.Module):
  """Multi-head self-attention with a packed q/k/v projection, its output
  laid out (3, heads, head_dim) as torch's."""
  heads: int

  @nn.compact
  def __call__(self, x):
    n, t, d = x.shape
    qkv = _dense(3 * d, 'qkv')(x).reshape(n, t, 3, self.heads, -1)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum('nqhc,nkhc->nhqk', q, k, precision=HIGHEST)
    logits /= np.sqrt(q.shape[-1])
    out = jnp.einsum('nhqk,nkhc->nqhc', jax.nn.softmax(logits), v,
                     precision=HIGHEST)
    return _dense(d, 'proj')(out.reshape(n, t, d))


class Mlp(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x):
    h = nn.gelu(_dense(self.hidden, 'fc1')(x), approximate=False)
    return _dense(x.shape[-1], 'fc2')(h)


class LayerScale(nn.Module):

  @nn.compact
  def __call__(self, x):
    return x * self.param('gamma', nn.initializers.ones, (x.shape[-1],))


class Block(nn.Module):
  """x + ls1(attn(norm1(x))), then + ls2(mlp(norm2(x)))."""
  heads: int
  hidden: int

  @nn.compact
  def __call__(self, x):
    x = x + LayerScale(name='ls1')(
        Attention(self.heads, name='attn')(_layer_norm('norm1')(x)))
    return x + LayerScale(name='ls2')(
        Mlp(self.hidden, name='mlp')(_layer_norm('norm2')(x)))


class PatchEmbed(nn.Module):
  embed_dim: int
  patch_size: int

  @nn.compact
  def __call__(self, x):
    return nn.Conv(self.embed_dim, (self.patch_size,) * 2,
                   strides=self.patch_size, padding='VALID', precision=HIGHEST,
                   name='proj')(x)


class DINOv2(nn.Module):
  """(N, H, W, 3) normalised images, H and W multiples of the patch size ->
  (N, embed_dim) class token after the final norm."""
  config: DINOv2Config

  @nn.compact
  def __call__(self, x):
    c = self.config
    if x.shape[1] % c.patch_size or x.shape[2] % c.patch_size:
      raise ValueError(f'Image size {x.shape[1:3]} is not a multiple of the '
                       f'patch size {c.patch_size}.')
    x = PatchEmbed(c.embed_dim, c.patch_size, name='patch_embed')(x)
    n, h, w, d = x.shape
    x = x.reshape(n, h * w, d)  # Row-major patches, as torch's flatten(2).
    init = nn.initializers.normal(0.02)
    cls = self.param('cls_token', init, (d,))
    pos = self.param('pos_embed', init, (1 + c.pos_grid ** 2, d))
    x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, d)), x], 1)
    x = x + interpolate_pos_embed(pos, (h, w))
    for i in range(c.depth):
      x = Block(c.num_heads, c.mlp_hidden, name=f'blocks_{i}')(x)
    return _layer_norm('norm')(x)[:, 0]


# ----------------------------------------------------------------------------
# Features.
# ----------------------------------------------------------------------------


def resize(x, size):
  """Float NHWC images -> (N, size, size, C), as torch's
  `interpolate(x, size=(size, size), mode='bicubic', antialias=True)`.

  Values are not clamped or rounded (EDM2 does neither).
  """
  h, w = x.shape[1:3]
  return _resample(
      x, None if h == size else antialiased_bicubic_matrix(h, size),
      None if w == size else antialiased_bicubic_matrix(w, size))


def normalize(x):
  """Resized [0, 255] float images -> the network's input: / 255, then
  ImageNet's mean and std, in EDM2's order."""
  x = x / 255.
  return (x - jnp.asarray(MEAN, jnp.float32)) / jnp.asarray(STD, jnp.float32)


def to_float(images):
  """uint8 (or [0, 255] float) NHWC images -> float32 RGB, values kept.
  Grayscale is repeated to RGB (EDM2 would fail on it)."""
  x = jnp.asarray(images, jnp.float32)
  return jnp.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def preprocess(images, size):
  """uint8 (or [0, 255] float) NHWC images of any size -> (N, size, size, 3)
  network input, as EDM2's DINOv2 detector: float32, resized, normalised."""
  return normalize(resize(to_float(images), size))


def features_fn(params, config):
  """`uint8 NHWC images of any size -> (N, embed_dim) float32 features`,
  pure jnp (no host work), to be called inside jit; batch-shardable."""
  model = DINOv2(config)
  return lambda images: model.apply(
      {'params': params}, preprocess(images, config.image_size))


# ----------------------------------------------------------------------------
# Weights.
# ----------------------------------------------------------------------------


def param_shapes(config):
  """{'blocks_0/attn/qkv/kernel': shape, ...} of the network for `config`."""
  abstract = jax.eval_shape(
      DINOv2(config).init, jax.random.key(0),
      jnp.zeros((1, config.image_size, config.image_size, 3)))['params']
  return weights.shapes(abstract)


FORMAT = weights.Format(
    what='DINOv2 weights',
    how_to_get=(
        'Download the original release\'s dinov2_vitl14_pretrain.pth '
        '(dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/, linked from '
        'github.com/facebookresearch/dinov2) or the model.safetensors of '
        'timm\'s timm/vit_large_patch14_dinov2.lvd142m on the Hugging Face '
        'hub, on a machine with internet, and convert it once with `python '
        '-m multistep_cm.tools.convert_dinov2 '
        '--weights=dinov2_vitl14_pretrain.pth --out=dinov2_vitl14.npz` '
        '(needs torch, or safetensors).'),
    converter='convert_dinov2', param_shapes=param_shapes,
    config_type=DINOv2Config, env='MULTISTEP_CM_DINOV2',
    where='does not match the DINOv2 config {config}')


def load_weights(path='', sha256=''):
  """Weights(params, config, sha256) from a `convert_dinov2` .npz (local or
  gs://; ${MULTISTEP_CM_DINOV2} when `path` is empty), its SHA-256 checked
  when one is given. Never downloads anything."""
  return FORMAT.load(path, sha256)
