"""What a network is conditioned on, as one value: unconditional, class
labels or captions, or a kind of your own.

A `Condition` knows its null condition (classifier-free guidance), drops the
condition of a fraction of examples at training time, says whether it
conditions at all (then a guided sampler costs two evaluations per step),
makes an example batch for initialisation, takes itself from a batch (every
batch holds it under `KEY`), and builds the network's inputs from it: a
vector added to the time embedding and, for captions, tokens to
cross-attend to. Losses, guidance and samplers take it instead of asking
what the labels look like.

A new kind subclasses `Condition` and overrides what differs; its network
inputs are built inside the model's Flax modules, so the modules it creates
are parameters of the model.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

KEY = 'cond'  # Where a batch holds the condition.


@dataclasses.dataclass(frozen=True)
class Condition:
  """Unconditional: the network is given an ignored placeholder (zeros)."""

  @property
  def conditional(self):
    """Whether the network sees the condition: guidance doubles its
    evaluations and dropout trains its null."""
    return False

  def example(self, n):
    """The condition of `n` examples, for initialising a network."""
    return jnp.zeros((n,), jnp.int32)

  def null(self, cond):
    """The null condition, shaped like `cond`."""
    return cond

  def from_batch(self, batch):
    """The condition of a training batch."""
    if KEY not in batch:
      raise KeyError(f'A batch holds its condition under {KEY!r}; this one '
                     f'has {sorted(batch)}.')
    return batch[KEY]

  def check(self, cond, batch):
    """Raises a one-line ValueError unless `cond` can be the condition of
    `batch` examples of this kind. Only shapes and dtypes are read, so it
    costs nothing at trace time. Unconditional takes any one array (the
    placeholder a batch carries) but refuses a dict of arrays, captions
    that it would ignore; a kind of your own may override it."""
    del batch
    if not self.conditional and (isinstance(cond, dict) or
                                 len(jax.tree.leaves(cond)) > 1):
      raise ValueError(
          f'cond is {_describe(cond)}, which condition=UNCONDITIONAL ignores: '
          'pass the condition it is, e.g. condition=Captions(length, width).')

  def drop(self, rng, cond, rate):
    """Replaces the condition of a fraction `rate` of examples by the null
    one, so one network learns the conditional and unconditional model."""
    if not self.conditional or rate == 0.:
      return cond
    n = jax.tree.leaves(cond)[0].shape[0]
    keep = jax.random.bernoulli(rng, 1. - rate, (n,))
    return jax.tree.map(
        lambda a, b: jnp.where(keep.reshape((n,) + (1,) * (a.ndim - 1)), a,
                               b), cond, self.null(cond))

  def vector(self, cond, dim, dtype):
    """(b, dim) added to the time embedding, or None. Called inside the
    network's Flax module: modules made here are its parameters."""
    del cond, dim, dtype
    return None

  def context(self, module, cond, dim, dtype, norm_float32=True):
    """(tokens (b, n, dim), mask (b, n)) every transformer block
    cross-attends to, or None. `module` is the network, for parameters."""
    del module, cond, dim, dtype, norm_float32
    return None


UNCONDITIONAL = Condition()


def _describe(cond):
  """`cond`'s structure, shapes and dtypes, for an error message."""
  if cond is None:
    return 'None'
  if isinstance(cond, dict):
    return 'a dict of ' + ', '.join(
        f'{k!r}: {_describe(v)}' for k, v in sorted(cond.items()))
  return f'{jnp.result_type(cond)} {tuple(jnp.shape(cond))}'


def _describe_shapes(shapes):
  return 'a dict of ' + ', '.join(f'{k!r}: {v}' for k, v in shapes.items())


def check_guidance(condition, guidance=0., label_dropout=0.):
  """Raises a one-line ValueError when guidance or label dropout is asked
  of a condition without a null: either would silently do nothing."""
  for name, value in (('guidance', guidance),
                      ('label_dropout', label_dropout)):
    if value and not condition.conditional:
      raise ValueError(
          f'{name}={value} needs a condition with a null, not '
          'UNCONDITIONAL: pass condition= (ClassLabels(n) or Captions(...)) '
          f'or {name}=0.')


@dataclasses.dataclass(frozen=True)
class ClassLabels(Condition):
  """Integer class labels in [0, num_classes); label `num_classes` is the
  null label."""
  num_classes: int

  def __post_init__(self):
    if self.num_classes < 1:
      raise ValueError(f'ClassLabels needs at least one class, not '
                       f'{self.num_classes}: use UNCONDITIONAL.')

  @property
  def conditional(self):
    return True

  def check(self, cond, batch):
    if (isinstance(cond, dict) or jnp.shape(cond) != (batch,) or
        not jnp.issubdtype(jnp.result_type(cond), jnp.integer)):
      raise ValueError(
          f'cond is {_describe(cond)}, but condition={self} takes integer '
          f'labels of shape ({batch},): pass those, or the condition that '
          'cond is (Captions(length, width) for caption arrays).')

  def null(self, cond):
    return jnp.full_like(cond, self.num_classes)

  def vector(self, cond, dim, dtype):
    return Embed(self.num_classes + 1, dim, dtype=dtype)(cond)


class Embed(nn.Embed):
  """nn.Embed (the same parameters, under the same name) whose table is
  gathered whole before the lookup when a mesh is in context
  (`jax.sharding.use_abstract_mesh`), as FSDP gathers a weight before using
  it: XLA otherwise computes the lookup's gradient in the table's sharding
  and replicates the batch's tensors to reshard them."""

  def __call__(self, inputs):
    table = self.embedding
    if not jax.sharding.get_abstract_mesh().empty:
      table = jax.lax.with_sharding_constraint(table, jax.P())
    return jnp.take(jnp.asarray(table, self.dtype), inputs, axis=0)


@dataclasses.dataclass(frozen=True)
class Captions(Condition):
  """Precomputed caption embeddings: {'text': (b, length, width) token
  embeddings, 'text_mask': (b, length) True at real tokens, and 'pooled':
  (b, pooled_width) when pooled_width > 0}. The null caption is every token
  masked and a zero pooled vector."""
  length: int
  width: int
  pooled_width: int = 0

  @property
  def conditional(self):
    return True

  def make(self, text, text_mask, pooled=None):
    """The condition of captions from their arrays."""
    cond = {'text': text, 'text_mask': text_mask}
    if self.pooled_width:
      cond['pooled'] = pooled
    return cond

  def check(self, cond, batch):
    shapes = {'text': (batch, self.length, self.width),
              'text_mask': (batch, self.length)}
    if self.pooled_width:
      shapes['pooled'] = (batch, self.pooled_width)
    if not (isinstance(cond, dict) and set(cond) == set(shapes) and all(
        jnp.shape(cond[k]) == v for k, v in shapes.items())):
      raise ValueError(
          f'cond is {_describe(cond)}, but condition={self} takes '
          f'{_describe_shapes(shapes)} (Captions.make): pad or cut captions '
          f'to length {self.length}, or pass the condition that cond is '
          '(ClassLabels(n) for labels).')

  def example(self, n):
    return self.make(jnp.zeros((n, self.length, self.width)),
                     jnp.zeros((n, self.length), bool),
                     jnp.zeros((n, self.pooled_width)))

  def null(self, cond):
    return jax.tree.map(jnp.zeros_like, cond)

  def vector(self, cond, dim, dtype):
    if not self.pooled_width:
      return None
    return nn.Dense(dim, dtype=dtype, name='pooled')(cond['pooled'])

  def context(self, module, cond, dim, dtype, norm_float32=True):
    """A learned null token, then the caption's tokens (masked ones zeroed,
    so that what padding holds cannot matter), normalised and projected
    once to `dim`."""
    text, mask = cond['text'], cond['text_mask'].astype(bool)
    null = module.param('text_null', nn.initializers.normal(0.02),
                        (1, 1, self.width), jnp.float32)
    tokens = jnp.concatenate(
        [jnp.broadcast_to(null, (text.shape[0],) + null.shape[1:]),
         jnp.where(mask[..., None], text, 0.)], axis=1)
    tokens = nn.LayerNorm(dtype=dtype, force_float32_reductions=norm_float32,
                          name='text_norm')(tokens.astype(dtype))
    tokens = nn.Dense(dim, dtype=dtype, name='text_proj')(tokens)
    return tokens, jnp.concatenate([jnp.ones_like(mask[:, :1]), mask], axis=1)
