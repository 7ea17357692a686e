"""Classifier-free guidance: the null conditioning at training time, the
guided prediction at sampling and distillation time. Networks are plain
functions `(params, z_t, t, labels, rng) -> v_prediction`. Labels are class
labels, where label `num_classes` is null, or a caption's dict
(`models.text_labels`), where the empty caption is null."""

import jax
import jax.numpy as jnp


def conditional(labels, num_classes):
  """Whether the labels condition the network: class labels of a dataset
  with classes, or captions."""
  return isinstance(labels, dict) or bool(num_classes)


def null_labels(labels, num_classes):
  """The null conditioning, shaped like `labels`: label `num_classes`, or a
  caption with every token masked and a zero pooled vector."""
  if isinstance(labels, dict):
    return jax.tree.map(jnp.zeros_like, labels)
  return jnp.full_like(labels, num_classes)


def drop_labels(rng, labels, rate, num_classes):
  """Replaces the labels of a fraction `rate` of examples by the null ones,
  so one network learns the conditional and unconditional model (for
  guidance): class-label dropout, or caption dropout."""
  if not conditional(labels, num_classes) or rate == 0.:
    return labels
  n = jax.tree.leaves(labels)[0].shape[0]
  keep = jax.random.bernoulli(rng, 1. - rate, (n,))
  return jax.tree.map(
      lambda a, b: jnp.where(keep.reshape((n,) + (1,) * (a.ndim - 1)), a, b),
      labels, null_labels(labels, num_classes))


def guided_v(network, params, z, t, labels, guidance=0., num_classes=0,
             rng=None):
  """(guided, conditional) v predictions: classifier-free guidance
  (1 + w) cond - w uncond in one batched call, or the plain prediction twice
  when unguided. Linear in v, so it guides x and eps alike."""
  if not (guidance and conditional(labels, num_classes)):
    v = network(params, z, t, labels, rng)
    return v, v
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), z.shape[:1])
  both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), labels,
                      null_labels(labels, num_classes))
  v = network(params, jnp.concatenate([z, z]), jnp.concatenate([t, t]), both,
              rng)
  cond, uncond = jnp.split(v, 2)
  return (1. + guidance) * cond - guidance * uncond, cond


def guided_network(network, guidance, num_classes, text=False):
  """The network under classifier-free guidance, (1 + w) cond - w uncond.
  `w = 0`, or a network conditioned on neither classes nor `text`, is the
  plain network: one evaluation."""
  if guidance == 0. or not (num_classes or text):
    return network

  def fn(params, z_t, t, labels, rng=None):
    return guided_v(network, params, z_t, t, labels, guidance, num_classes,
                    rng)[0]
  return fn
