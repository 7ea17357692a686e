"""Denoising networks: the UViT of simple diffusion and an MLP for 2-D data.

Both predict v = alpha eps - sigma x from (z_t, t, cond), where a
`conditioning.Condition` builds the network's inputs from `cond`. Losses and samplers
never see these classes: they see the plain function of `network_fn`, so any
JAX model with that signature, or an analytic denoiser, can take their place.

The modules are Flax Linen: a Linen model is a pure `apply(params, ...)` over a
plain parameter pytree, which is exactly the interface the library exposes and
what the sharding rules and checkpoints work on.
"""

import dataclasses
import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from multistep_cm import conditioning
from multistep_cm import targets


@dataclasses.dataclass(frozen=True)
class Level:
  """One resolution level of the U: `num_blocks` blocks of `kind` ('res' for
  convolutional ResBlocks, 'attn' for transformer blocks) at `channels`."""
  kind: str
  channels: int
  num_blocks: int
  dropout: float = 0.


@dataclasses.dataclass(frozen=True)
class UViTConfig:
  """Hyper-parameters of a UViT. Levels run from the input resolution down;
  each is followed by a 2x2 average pool, then the middle transformer runs at
  the lowest resolution. The up path mirrors the down path."""
  levels: Sequence[Level]
  mid_channels: int
  mid_blocks: int
  mid_dropout: float = 0.
  mlp_ratio: int = 4
  head_dim: int = 64
  emb_dim: int = 1024
  # What the network is conditioned on: its vector joins the time embedding;
  # its tokens (captions), if any, are cross-attended to by every transformer
  # block.
  condition: conditioning.Condition = conditioning.UNCONDITIONAL
  out_channels: int = 3
  dtype: str = 'bfloat16'
  # auto, xla, cudnn or splash: see attention_implementation.
  attention: str = 'auto'
  # The middle blocks as one nn.scan: one block to compile whatever the depth;
  # their parameters gain a leading axis (`relayout` converts checkpoints).
  scan: bool = False
  remat: str = 'none'  # Blocks recomputed in the backward pass: see REMAT.
  # Normalisation statistics in float32 (else in `dtype`, e.g. bfloat16).
  norm_float32: bool = True


ATTENTION = ('auto', 'xla', 'cudnn', 'splash')
# What a rematerialised block keeps for its backward pass: nothing ('full'),
# or the results of its matrix multiplications ('dots_saveable').
REMAT = {'none': None, 'full': jax.checkpoint_policies.nothing_saveable,
         'dots_saveable': jax.checkpoint_policies.dots_saveable}
SCANNED = 'mid_blocks'  # The scanned middle stack, in the parameter tree.


def attention_implementation(name, dtype, head_dim, backend=None):
  """The attention kernel for config.model.attention: 'auto' is cuDNN's
  flash attention on GPUs, where its shape and dtype rules allow it (16-bit
  inputs, head_dim a multiple of 8 up to 128), the TPU's flash attention
  ('splash', Pallas) on TPUs, and XLA's elsewhere (the CPU); 'xla', 'cudnn'
  and 'splash' force one. The platform is `targets.platform()`: the host's,
  or a target's being compiled for."""
  if name not in ATTENTION:
    raise ValueError(f'Unknown attention {name!r}: expected one of '
                     f'{", ".join(ATTENTION)}.')
  if name != 'auto':
    return name
  backend = backend or targets.platform()
  fits = (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
          and head_dim % 8 == 0 and head_dim <= 128)
  if backend == 'tpu':
    return 'splash'
  return 'cudnn' if backend == 'gpu' and fits else 'xla'


# Splash attention's key blocks are a multiple of this (the TPU's lanes).
SPLASH_BLOCK = 128


def _splash_kernel(q_len, kv_len, heads, interpret):
  # Built in each trace: the kernel holds its mask's arrays, made in it.
  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  mask = splash.MultiHeadMask([splash.FullMask((q_len, kv_len))] * heads)
  q, kv = min(512, q_len), min(512, kv_len)
  blocks = splash.BlockSizes(
      block_q=q, block_kv=kv, block_kv_compute=kv, block_q_dkv=q,
      block_kv_dkv=kv, block_kv_dkv_compute=kv, block_q_dq=q, block_kv_dq=kv)
  return splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1,
                                block_sizes=blocks, interpret=interpret)


def _splash(q, k, v):
  """Attention of (batch, length, heads, head_dim) inputs by the TPU's
  Pallas flash attention, each device on its own rows of the batch; off a
  TPU (the CPU) in Pallas's interpret mode."""
  heads, head_dim = q.shape[2:]
  kernel = _splash_kernel(q.shape[1], k.shape[1], heads,
                          targets.platform() != 'tpu')
  to_heads = lambda x: jnp.swapaxes(x, 1, 2)  # The kernel's (H, L, D).

  def attend(q, k, v):
    out = jax.vmap(kernel)(to_heads(q * head_dim ** -0.5).astype(k.dtype),
                           to_heads(k), to_heads(v))
    return to_heads(out)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or q.shape[0] % mesh.size:
    return attend(q, k, v)
  # A Pallas kernel is one opaque call to XLA's partitioner, which would
  # gather its inputs whole: each device runs it on its own rows.
  rows = jax.P(tuple(mesh.axis_names))
  return jax.shard_map(attend, mesh=mesh, in_specs=(rows,) * 3,
                       out_specs=rows, check_vma=False)(q, k, v)


def dot_product_attention(q, k, v, implementation):
  """`jax.nn.dot_product_attention` of self-attention, by `implementation`
  (attention_implementation's): 'splash' where both lengths are multiples
  of SPLASH_BLOCK, XLA's for other lengths."""
  if implementation == 'splash':
    if q.shape[1] % SPLASH_BLOCK or k.shape[1] % SPLASH_BLOCK:
      implementation = 'xla'
    else:
      return _splash(q, k, v)
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


def constrain_batch(x):
  """`x`, an activation, with its leading (batch) axis split over every axis
  of the mesh in context (`jax.sharding.use_abstract_mesh`), if one is set
  and divides it; else `x`."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or x.shape[0] % mesh.size:
    return x
  return jax.lax.with_sharding_constraint(x, jax.P(tuple(mesh.axis_names)))


def timestep_embedding(t, dim, max_period=10_000.):
  """Sinusoidal features of 1000 t, the usual scale for t in [0, 1]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half) / half)
  args = 1000. * t[:, None].astype(jnp.float32) * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


# Where checkpoints hold TimeEmbedding's parameters: the module's name from
# before it was named apart from `conditioning.Condition`.
TIME_EMBEDDING = 'Conditioning_0'


class TimeEmbedding(nn.Module):
  """Embedding of time and the condition's vector (a class embedding, a
  pooled caption vector, ...), shared by all blocks; `extra`, a vector of
  the same width (the boundary's embedding), joins them."""
  emb_dim: int
  condition: conditioning.Condition
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, t, cond, extra=None):
    emb = timestep_embedding(t, min(self.emb_dim, 512))
    emb = nn.Dense(self.emb_dim, dtype=self.dtype)(emb)
    emb = nn.Dense(self.emb_dim, dtype=self.dtype)(nn.silu(emb))
    vector = self.condition.vector(cond, self.emb_dim, self.dtype)
    if vector is not None:
      emb += vector
    if extra is not None:
      emb += extra.astype(emb.dtype)
    return nn.silu(emb)


# Where a network keeps BoundaryEmbedding's parameters: at the top of its
# tree, the one subtree an any-S student has that its teacher lacks.
BOUNDARY = 'boundary_embedding'


class BoundaryEmbedding(nn.Module):
  """The embedding of the boundary an any-S student maps to: the lower end
  (k - 1) / S of the segment its time t is in, where DDIM from its x
  prediction must land on the teacher's ODE. Embedded like time, and added
  to time's embedding; the last projection starts at zero, so a network
  given a boundary starts exactly as the network without (its teacher)."""
  emb_dim: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, boundary):
    h = timestep_embedding(boundary, min(self.emb_dim, 512))
    h = nn.Dense(self.emb_dim, dtype=self.dtype)(h)
    return nn.Dense(self.emb_dim, dtype=self.dtype,
                    kernel_init=nn.initializers.zeros)(nn.silu(h))


def boundary_embedding(boundary, batch, emb_dim, dtype):
  """BoundaryEmbedding (named BOUNDARY) of `boundary`, broadcast over the
  batch, or None without one. Called inside a network's compact method."""
  if boundary is None:
    return None
  boundary = jnp.broadcast_to(jnp.asarray(boundary, jnp.float32), (batch,))
  return BoundaryEmbedding(emb_dim, dtype, name=BOUNDARY)(boundary)


def _groups(channels):
  return math.gcd(32, channels)


class ResBlock(nn.Module):
  channels: int
  dropout: float
  dtype: jnp.dtype
  norm_float32: bool = True

  @nn.compact
  def __call__(self, x, emb, train):
    norm = functools.partial(nn.GroupNorm, dtype=self.dtype,
                             force_float32_reductions=self.norm_float32)
    h = nn.silu(norm(_groups(x.shape[-1]))(x))
    h = nn.Conv(self.channels, (3, 3), dtype=self.dtype)(h)
    scale, shift = jnp.split(
        nn.Dense(2 * self.channels, dtype=self.dtype)(emb)[:, None, None], 2,
        axis=-1)
    h = norm(_groups(self.channels))(h)
    h = nn.silu(h * (1 + scale) + shift)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    # Zero init: each block starts as the identity, which keeps deep Us stable.
    h = nn.Conv(self.channels, (3, 3), dtype=self.dtype,
                kernel_init=nn.initializers.zeros)(h)
    if x.shape[-1] != self.channels:
      x = nn.Dense(self.channels, dtype=self.dtype)(x)
    return x + h


class TransformerBlock(nn.Module):
  """Pre-norm transformer block with adaptive layer norm from the embedding."""
  channels: int
  head_dim: int
  mlp_ratio: int
  dropout: float
  dtype: jnp.dtype
  attention: str = 'xla'  # A resolved implementation: xla, cudnn, splash.
  norm_float32: bool = True

  @nn.compact
  def __call__(self, x, emb, train, context=None):
    d, heads = self.channels, max(1, self.channels // self.head_dim)
    mod = nn.Dense(4 * d, dtype=self.dtype,
                   kernel_init=nn.initializers.zeros)(emb)[:, None]
    s1, b1, s2, b2 = jnp.split(mod, 4, axis=-1)
    drop = nn.Dropout(self.dropout, deterministic=not train)
    norm = functools.partial(nn.LayerNorm, use_scale=False, use_bias=False,
                             dtype=self.dtype,
                             force_float32_reductions=self.norm_float32)

    h = norm()(x)
    h = h * (1 + s1) + b1
    qkv = nn.DenseGeneral((3, heads, d // heads), dtype=self.dtype)(h)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    h = dot_product_attention(q, k, v, self.attention)
    h = nn.DenseGeneral(d, axis=(-2, -1), dtype=self.dtype,
                        kernel_init=nn.initializers.zeros)(h)
    x = x + drop(h)

    if context is not None:
      # Cross-attention to the caption: every query also sees a learned null
      # token, so an empty caption is well defined.
      tokens, mask = context
      h = norm()(x)
      q = nn.DenseGeneral((heads, d // heads), dtype=self.dtype,
                          name='cross_q')(h)
      kv = nn.DenseGeneral((2, heads, d // heads), dtype=self.dtype,
                           name='cross_kv')(tokens)
      h = jax.nn.dot_product_attention(q, kv[:, :, 0], kv[:, :, 1],
                                       mask=mask[:, None, None, :])
      h = nn.DenseGeneral(d, axis=(-2, -1), dtype=self.dtype,
                          kernel_init=nn.initializers.zeros,
                          name='cross_out')(h)
      x = x + drop(h)

    h = norm()(x)
    h = h * (1 + s2) + b2
    h = nn.gelu(nn.Dense(self.mlp_ratio * d, dtype=self.dtype)(h))
    h = drop(h)
    h = nn.Dense(d, dtype=self.dtype, kernel_init=nn.initializers.zeros)(h)
    return x + drop(h)


class UViT(nn.Module):
  """U-Net whose low-resolution levels are transformers (simple diffusion)."""
  config: UViTConfig

  def _block(self, kind, channels, dropout, dtype, names):
    """A block named as Linen names it unwrapped (ResBlock_3,
    TransformerBlock_0): remat leaves the parameter tree as it is."""
    names[kind] += 1
    return _block(kind, self.config, channels, dropout, dtype,
                  f'{_BLOCKS[kind].__name__}_{names[kind] - 1}')

  @nn.compact
  def __call__(self, z, t, cond, train=False, boundary=None):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), z.shape[:1])
    context = cfg.condition.context(self, cond, cfg.emb_dim, dtype,
                                    cfg.norm_float32)
    emb = TimeEmbedding(cfg.emb_dim, cfg.condition, dtype,
                        name=TIME_EMBEDDING)(
                            t, cond, boundary_embedding(
                                boundary, z.shape[0], cfg.emb_dim, dtype))
    h = nn.Conv(cfg.levels[0].channels, (3, 3), dtype=dtype)(z.astype(dtype))

    skips, names = [], {'res': 0, 'attn': 0}
    for i, lv in enumerate(cfg.levels):
      h = self._enter(h, lv.kind, lv.channels, dtype, f'down_in_{i}')
      for _ in range(lv.num_blocks):
        h = self._apply(self._block(lv.kind, lv.channels, lv.dropout, dtype,
                                    names), h, emb, train, context)
        skips.append(h)
      h = nn.avg_pool(h, (2, 2), (2, 2))

    h = self._enter(h, 'attn', cfg.mid_channels, dtype, 'mid_in')
    if cfg.scan:
      stack = nn.scan(_ScanStep, variable_axes={'params': 0},
                      split_rngs={'params': True, 'dropout': True},
                      in_axes=nn.broadcast, length=cfg.mid_blocks)
      b, hh, ww, c = h.shape
      h = stack(cfg, dtype, train, name=SCANNED)(
          h.reshape(b, hh * ww, c), emb, context)[0].reshape(h.shape)
      names['attn'] += cfg.mid_blocks  # The up path's names stay the same.
    for _ in range(0 if cfg.scan else cfg.mid_blocks):
      h = self._apply(self._block('attn', cfg.mid_channels, cfg.mid_dropout,
                                  dtype, names), h, emb, train, context)

    for i, lv in reversed(list(enumerate(cfg.levels))):
      h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
      h = nn.Dense(lv.channels, dtype=dtype, name=f'up_in_{i}')(h)
      for _ in range(lv.num_blocks):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = nn.Dense(lv.channels, dtype=dtype)(h)
        h = self._apply(self._block(lv.kind, lv.channels, lv.dropout, dtype,
                                    names), h, emb, train, context)

    h = nn.silu(nn.GroupNorm(_groups(h.shape[-1]), dtype=dtype,
                             force_float32_reductions=cfg.norm_float32)(h))
    out = nn.Conv(cfg.out_channels, (3, 3), dtype=dtype,
                  kernel_init=nn.initializers.zeros)(h)
    return out.astype(jnp.float32)

  def _enter(self, h, kind, channels, dtype, name):
    """Projects to a level's width; transformer levels also get a learned
    position embedding, since attention alone cannot tell positions apart."""
    h = nn.Dense(channels, dtype=dtype, name=name)(h)
    if kind == 'attn':
      pos = self.param(f'{name}_pos', nn.initializers.normal(0.02),
                       h.shape[1:], jnp.float32)
      h = h + pos.astype(dtype)
    return h

  @staticmethod
  def _apply(block, h, emb, train, context=None):
    if isinstance(block, ResBlock):
      return block(h, emb, train)
    b, hh, ww, c = h.shape
    return block(h.reshape(b, hh * ww, c), emb, train,
                 context).reshape(h.shape)


_BLOCKS = {'res': ResBlock, 'attn': TransformerBlock}


def _block(kind, cfg, channels, dropout, dtype, name):
  """One block of a UViT, rematerialised if `cfg.remat` says so."""
  if kind == 'res':
    cls, args = ResBlock, (channels, dropout, dtype, cfg.norm_float32)
  else:
    heads = max(1, channels // cfg.head_dim)
    cls, args = TransformerBlock, (
        channels, cfg.head_dim, cfg.mlp_ratio, dropout, dtype,
        attention_implementation(cfg.attention, dtype, channels // heads),
        cfg.norm_float32)
  if cfg.remat != 'none':
    # Arguments self, x, emb, train: train is a Python bool.
    cls = nn.remat(cls, policy=REMAT[cfg.remat], static_argnums=(3,))
  return cls(*args, name=name)


class _ScanStep(nn.Module):
  """One middle block as a step of the scan over the stack: (h, emb,
  context) -> (h, None). `train` is an attribute: a scan carries arrays."""
  config: UViTConfig
  dtype: jnp.dtype
  train: bool

  @nn.compact
  def __call__(self, h, emb, context):
    cfg = self.config
    block = _block('attn', cfg, cfg.mid_channels, cfg.mid_dropout, self.dtype,
                   'block')
    # Under FSDP, XLA otherwise partitions the scan's body like its sharded
    # weights and computes it over the whole batch on every device.
    h = constrain_batch(h)
    return constrain_batch(block(h, emb, self.train, context)), None


def _mid_names(config):
  """Names of the middle blocks in the unscanned tree: the transformer blocks
  after those of the down path."""
  first = sum(lv.num_blocks for lv in config.levels if lv.kind == 'attn')
  return [f'TransformerBlock_{first + i}' for i in range(config.mid_blocks)]


def relayout(params, config):
  """Parameters of a UViT in either layout (middle blocks scanned or not),
  in the layout of `config.scan`: the same weights, stacked along a new
  leading axis or split from it. Lets a checkpoint of one layout load into
  a model of the other."""
  params = dict(params)
  names = _mid_names(config)
  if config.scan and SCANNED not in params:
    blocks = [params.pop(n) for n in names]
    params[SCANNED] = {'block': jax.tree.map(lambda *b: jnp.stack(b),
                                             *blocks)}
  elif not config.scan and SCANNED in params:
    stacked = params.pop(SCANNED)['block']
    for i, n in enumerate(names):
      params[n] = jax.tree.map(lambda a, i=i: a[i], stacked)
  return params


@dataclasses.dataclass(frozen=True)
class MLPConfig:
  """A residual MLP denoiser for low-dimensional data such as toy2d."""
  width: int = 256
  num_blocks: int = 4
  emb_dim: int = 128
  condition: conditioning.Condition = conditioning.UNCONDITIONAL
  out_channels: int = 2
  dropout: float = 0.
  dtype: str = 'float32'


class MLP(nn.Module):
  config: MLPConfig

  @nn.compact
  def __call__(self, z, t, cond, train=False, boundary=None):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), z.shape[:1])
    emb = TimeEmbedding(cfg.emb_dim, cfg.condition, dtype,
                        name=TIME_EMBEDDING)(
                            t, cond, boundary_embedding(
                                boundary, z.shape[0], cfg.emb_dim, dtype))
    h = nn.Dense(cfg.width, dtype=dtype)(z.astype(dtype))
    for _ in range(cfg.num_blocks):
      g = nn.LayerNorm(dtype=dtype)(h) + nn.Dense(cfg.width, dtype=dtype)(emb)
      g = nn.Dense(cfg.width, dtype=dtype)(nn.silu(g))
      g = nn.Dropout(cfg.dropout, deterministic=not train)(nn.silu(g))
      h = h + nn.Dense(cfg.width, dtype=dtype)(g)
    out = nn.Dense(cfg.out_channels, dtype=dtype,
                   kernel_init=nn.initializers.zeros)(nn.silu(h))
    return out.astype(jnp.float32)


def network_fn(model):
  """The plain function `(params, z_t, t, cond, rng) -> v_prediction` that
  losses and samplers take. `rng=None` means evaluation mode (no dropout).
  An any-S student also takes `boundary`, the time its segment ends at
  (`BoundaryEmbedding`); without it, it is its teacher's network."""
  def fn(params, z_t, t, cond, rng=None, boundary=None):
    train = rng is not None
    rngs = {'dropout': rng} if train else {}
    extra = {} if boundary is None else {'boundary': boundary}
    return model.apply({'params': params}, z_t, t, cond, train=train,
                       rngs=rngs, **extra)
  return fn


def count_params(params):
  return sum(math.prod(p.shape) for p in jax.tree.leaves(params))
