"""CLIP image and text embeddings, and the CLIP score of text-to-image samples.

The network is open_clip's `CLIP` with a ViT image tower (conv patch embedding
without bias, class token, learned positions, ln_pre, pre-LN residual
attention blocks, ln_post on the class token, projection) and its causal text
transformer, pooled at the end-of-text token (the largest token id, open_clip's
default `text_pool_type='argmax'`). QuickGELU or exact GELU follows the
checkpoint's `quick_gelu`. Every matmul runs at HIGHEST precision, as in
`inception.py`.

Weights are a `.npz` written by `convert_clip`: float32 arrays named like the
parameters here ('visual/transformer/resblocks_0/attn/in_proj/kernel'), plus
the `CLIPConfig` as JSON under '__config__', so the file alone rebuilds the
model.

Tokens: open_clip's BPE tokenizer is not reimplemented here. The evaluation
prompts (a text file, one prompt per line) are tokenized once, on a machine
with open_clip, by `python -m multistep_cm.tools.convert_clip
--prompts=prompts.txt --model=ViT-B-32 --out=prompt_tokens.npz`; `load_tokens`
reads the result.
"""

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from multistep_cm import weights

HIGHEST = jax.lax.Precision.HIGHEST
# OpenAI's preprocessing constants, also open_clip's default for its own ViTs.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """open_clip's hyperparameters that shape the network; defaults: ViT-B-32."""
  embed_dim: int = 512
  image_size: int = 224
  patch_size: int = 32
  vision_width: int = 768
  vision_layers: int = 12
  vision_heads: int = 12
  vision_mlp_ratio: float = 4.0
  context_length: int = 77
  vocab_size: int = 49408
  text_width: int = 512
  text_layers: int = 12
  text_heads: int = 8
  text_mlp_ratio: float = 4.0
  quick_gelu: bool = False

  def to_json(self):
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_json(cls, text):
    return cls(**json.loads(text))


# ----------------------------------------------------------------------------
# The network.
# ----------------------------------------------------------------------------


def _layer_norm(name):
  # torch's eps and two-pass variance; flax defaults to 1e-6 and E[x²]-E[x]².
  return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name)


def _dense(features, name):
  return nn.Dense(features, precision=HIGHEST, name=name)


class Attention(nn.Module):
  """Multi-head self-attention with torch's packed q/k/v input projection."""
  heads: int

  @nn.compact
  def __call__(self, x, causal):
    n, t, d = x.shape
    qkv = _dense(3 * d, 'in_proj')(x).reshape(n, t, 3, self.heads, -1)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum('nqhc,nkhc->nhqk', q, k, precision=HIGHEST)
    logits /= np.sqrt(q.shape[-1])
    if causal:
      logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -jnp.inf)
    out = jnp.einsum('nhqk,nkhc->nqhc', jax.nn.softmax(logits), v,
                     precision=HIGHEST)
    return _dense(d, 'out_proj')(out.reshape(n, t, d))


class Mlp(nn.Module):
  hidden: int
  quick_gelu: bool

  @nn.compact
  def __call__(self, x):
    h = _dense(self.hidden, 'c_fc')(x)
    # OpenAI trained with QuickGELU, most LAION models with the exact GELU.
    h = (h * jax.nn.sigmoid(1.702 * h) if self.quick_gelu
         else nn.gelu(h, approximate=False))
    return _dense(x.shape[-1], 'c_proj')(h)


class ResidualBlock(nn.Module):
  """Pre-LN attention and MLP, each added back to the residual stream."""
  heads: int
  mlp_ratio: float
  quick_gelu: bool
  causal: bool

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = x + Attention(self.heads, name='attn')(_layer_norm('ln_1')(x),
                                               self.causal)
    return x + Mlp(int(width * self.mlp_ratio), self.quick_gelu,
                   name='mlp')(_layer_norm('ln_2')(x))


class Transformer(nn.Module):
  layers: int
  heads: int
  mlp_ratio: float
  quick_gelu: bool
  causal: bool

  @nn.compact
  def __call__(self, x):
    for i in range(self.layers):
      x = ResidualBlock(self.heads, self.mlp_ratio, self.quick_gelu,
                        self.causal, name=f'resblocks_{i}')(x)
    return x


class VisionTransformer(nn.Module):
  """(N, S, S, 3) normalised images -> (N, embed_dim) unnormalised."""
  config: CLIPConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    x = nn.Conv(c.vision_width, (c.patch_size,) * 2, strides=c.patch_size,
                padding='VALID', use_bias=False, precision=HIGHEST,
                name='conv1')(x)
    n = x.shape[0]
    x = x.reshape(n, -1, c.vision_width)  # Row-major patches, as torch's.
    init = nn.initializers.normal(c.vision_width ** -0.5)
    cls = self.param('class_embedding', init, (c.vision_width,))
    pos = self.param('positional_embedding', init,
                     (x.shape[1] + 1, c.vision_width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, c.vision_width)), x], 1)
    x = _layer_norm('ln_pre')(x + pos)
    x = Transformer(c.vision_layers, c.vision_heads, c.vision_mlp_ratio,
                    c.quick_gelu, causal=False, name='transformer')(x)
    x = _layer_norm('ln_post')(x[:, 0])
    proj = self.param('proj', init, (c.vision_width, c.embed_dim))
    return jnp.dot(x, proj, precision=HIGHEST)


class CLIP(nn.Module):
  """open_clip's `CLIP` (ViT image tower), names as in its state dict."""
  config: CLIPConfig

  def setup(self):
    c = self.config
    init = nn.initializers.normal(c.text_width ** -0.5)
    self.visual = VisionTransformer(c)
    self.token_embedding = nn.Embed(c.vocab_size, c.text_width)
    self.positional_embedding = self.param(
        'positional_embedding', init, (c.context_length, c.text_width))
    self.transformer = Transformer(c.text_layers, c.text_heads,
                                   c.text_mlp_ratio, c.quick_gelu, causal=True)
    self.ln_final = _layer_norm(None)
    self.text_projection = self.param('text_projection', init,
                                      (c.text_width, c.embed_dim))

  def encode_image(self, images):
    return self.visual(images)

  def encode_text(self, tokens):
    """(N, T <= context_length) token ids -> (N, embed_dim) unnormalised.

    Causal attention lets the padding after the end-of-text token be cut off
    without changing the result.
    """
    t = tokens.shape[1]
    x = self.token_embedding(tokens) + self.positional_embedding[:t]
    x = self.ln_final(self.transformer(x))
    x = x[jnp.arange(x.shape[0]), jnp.argmax(tokens, axis=-1)]
    return jnp.dot(x, self.text_projection, precision=HIGHEST)

  def __call__(self, images, tokens):
    return self.encode_image(images), self.encode_text(tokens)


# ----------------------------------------------------------------------------
# Features and score.
# ----------------------------------------------------------------------------


def preprocess(images, size):
  """uint8 (or [0, 255] float) NHWC images -> normalised (N, size, size, 3).

  As OpenAI's preprocessing: the shorter side is resized to `size` (bicubic,
  antialiased when shrinking; PIL's kernel, not bit-exact), the centre
  cropped, values rounded into [0, 255] like PIL's uint8 output.
  """
  x = jnp.asarray(images, jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  n, h, w, ch = x.shape
  if (h, w) != (size, size):
    # torchvision's Resize(int): the longer side truncated, not rounded.
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    x = jax.image.resize(x, (n, nh, nw, ch), 'bicubic', antialias=True)
    top, left = int(round((nh - size) / 2.)), int(round((nw - size) / 2.))
    x = jnp.round(jnp.clip(x[:, top:top + size, left:left + size], 0., 255.))
  return (x / 255. - jnp.asarray(MEAN)) / jnp.asarray(STD)


def _l2_normalize(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames='config')
def image_features(params, images, config):
  """L2-normalised image embeddings of uint8 (or [0, 255] float) NHWC
  images of any size."""
  x = preprocess(images, config.image_size)
  return _l2_normalize(CLIP(config).apply({'params': params}, x,
                                          method=CLIP.encode_image))


def text_features(params, tokens, config):
  """L2-normalised text embeddings of (N, T) open_clip token ids."""
  shape = np.shape(tokens)
  if len(shape) != 2 or shape[1] > config.context_length:
    raise weights.WeightsError(
        f'Token ids of shape {shape} do not fit the CLIP model\'s '
        f'context of {config.context_length}: tokenized for another model?')
  return _text_features(params, tokens, config)


@functools.partial(jax.jit, static_argnames='config')
def _text_features(params, tokens, config):
  return _l2_normalize(CLIP(config).apply(
      {'params': params}, jnp.asarray(tokens, jnp.int32),
      method=CLIP.encode_text))


def clip_score(image_feats, text_feats):
  """Mean over matching pairs (rows) of max(cos(image, text), 0): on the
  scale of the paper's Table 6 (0.30-0.32 for its models).

  Hessel et al. 2021 define CLIP-S = w * max(cos, 0) with w = 2.5, and many
  text-to-image papers (and torchmetrics' CLIPScore) report it with w = 100;
  the multistep paper reports the cosine itself (w = 1), as this does.
  Clamping is per pair, as in Hessel et al. Features need not be normalised.
  """
  a = np.asarray(image_feats, np.float64)
  b = np.asarray(text_feats, np.float64)
  if a.shape != b.shape or a.ndim != 2:
    raise ValueError(f'Expected two (N, D) arrays of pairs, got {a.shape} and '
                     f'{b.shape}.')
  cos = np.sum(a * b, -1) / np.maximum(
      np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
  return float(np.mean(np.maximum(cos, 0.)))


# ----------------------------------------------------------------------------
# Weights and tokens.
# ----------------------------------------------------------------------------


def param_shapes(config):
  """{'visual/conv1/kernel': shape, ...} of the network for `config`."""
  abstract = jax.eval_shape(
      CLIP(config).init, jax.random.key(0),
      jnp.zeros((1, config.image_size, config.image_size, 3)),
      jnp.zeros((1, config.context_length), jnp.int32))['params']
  return weights.shapes(abstract)


FORMAT = weights.Format(
    what='CLIP weights',
    how_to_get=(
        'Convert an open_clip ViT checkpoint once, on a machine with torch: '
        '`python -m multistep_cm.tools.convert_clip --weights=<state dict '
        '.safetensors/.bin/.pt> --model=<open_clip name, e.g. ViT-B-32> '
        '--out=clip.npz` (OpenAI\'s weights need a -quickgelu name).'),
    converter='convert_clip', param_shapes=param_shapes,
    config_type=CLIPConfig, where='does not match the CLIP config {config}')


def load_weights(path, sha256=''):
  """Weights(params, config, sha256) from a `convert_clip` .npz (local or
  gs://). Never downloads anything."""
  return FORMAT.load(path, sha256)


def load_tokens(path, sha256=''):
  """(prompts, (N, context_length) int32 token ids) written by
  `convert_clip --prompts`."""
  arrays, _ = weights.read_npz(path, sha256, 'prompt tokens')
  if set(arrays) != {'prompts', 'tokens'} or arrays['tokens'].ndim != 2 or (
      len(arrays['prompts']) != len(arrays['tokens'])):
    raise weights.WeightsError(
        f'{path} is not a prompt-token file of convert_clip --prompts.')
  return [str(p) for p in arrays['prompts']], arrays['tokens'].astype(np.int32)
