"""Classifier-free guidance: the guided prediction at sampling and
distillation time, (1 + w) cond - w uncond. Networks are plain functions
`(params, z_t, t, cond, rng) -> v_prediction`; what `cond` is, and its null,
is said by a `conditioning.Condition` (the condition's own `drop` trains the
null)."""

import jax
import jax.numpy as jnp

from multistep_cm import conditioning


def guided_v(network, params, z, t, cond, guidance=0.,
             condition=conditioning.UNCONDITIONAL, rng=None):
  """(guided, conditional) v predictions: classifier-free guidance
  (1 + w) cond - w uncond in one batched call, or the plain prediction twice
  when unguided. Linear in v, so it guides x and eps alike. Guidance of
  UNCONDITIONAL, or a `cond` that is not of `condition`'s kind, is a
  ValueError (`conditioning.check_guidance`, `Condition.check`)."""
  conditioning.check_guidance(condition, guidance)
  condition.check(cond, z.shape[0])
  if not guidance:
    v = network(params, z, t, cond, rng)
    return v, v
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), z.shape[:1])
  both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), cond,
                      condition.null(cond))
  v = network(params, jnp.concatenate([z, z]), jnp.concatenate([t, t]), both,
              rng)
  conditional, unconditional = jnp.split(v, 2)
  return (1. + guidance) * conditional - guidance * unconditional, conditional


def guided_network(network, guidance, condition):
  """The network under classifier-free guidance, (1 + w) cond - w uncond.
  `w = 0`, or an unconditional network, is the plain network: one
  evaluation."""
  if guidance == 0. or not condition.conditional:
    return network

  def fn(params, z_t, t, cond, rng=None):
    return guided_v(network, params, z_t, t, cond, guidance, condition,
                    rng)[0]
  return fn
