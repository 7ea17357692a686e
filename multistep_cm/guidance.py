"""Classifier-free guidance: the null label at training time, the guided
prediction at sampling and distillation time. Networks are plain functions
`(params, z_t, t, labels, rng) -> v_prediction`; label `num_classes` is null."""

import jax
import jax.numpy as jnp


def drop_labels(rng, labels, rate, num_classes):
  """Replaces a fraction `rate` of labels by the null label `num_classes`, so
  one network learns the conditional and unconditional model (for guidance)."""
  if not num_classes or rate == 0.:
    return labels
  keep = jax.random.bernoulli(rng, 1. - rate, labels.shape)
  return jnp.where(keep, labels, num_classes)


def guided_v(network, params, z, t, labels, guidance=0., num_classes=0,
             rng=None):
  """(guided, conditional) v predictions: classifier-free guidance
  (1 + w) cond - w uncond in one batched call, or the plain prediction twice
  when unguided. Linear in v, so it guides x and eps alike."""
  if not (guidance and num_classes):
    v = network(params, z, t, labels, rng)
    return v, v
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), z.shape[:1])
  null = jnp.full_like(labels, num_classes)
  v = network(params, jnp.concatenate([z, z]), jnp.concatenate([t, t]),
              jnp.concatenate([labels, null]), rng)
  cond, uncond = jnp.split(v, 2)
  return (1. + guidance) * cond - guidance * uncond, cond


def guided_network(network, guidance, num_classes):
  """The network under classifier-free guidance, (1 + w) cond - w uncond.
  `w = 0` is the plain network: one evaluation."""
  if guidance == 0. or not num_classes:
    return network

  def fn(params, z_t, t, labels, rng=None):
    return guided_v(network, params, z_t, t, labels, guidance, num_classes,
                    rng)[0]
  return fn
