"""Samplers. Each runs its whole loop as one `lax.fori_loop`, so a sampler is
a single compiled program whatever its step count; jit it with the batch
sharded over the mesh to sample on many devices.

`KINDS` is the table of samplers (the student's, DDIM, aDDIM, ancestral
DDPM); `SamplerSpec` names one of them, its steps and guidance: the one value
the framework passes around to say how to sample. To add a sampler: its
function here and a row in `KINDS`.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from multistep_cm import conditioning
from multistep_cm import ddim
from multistep_cm import guidance as guidance_lib
from multistep_cm import schedules


def analytic_x_var(logsnr):
  """v_x(t) = 0.1 / (2 + SNR(t)): 10% of the posterior variance of x under a
  factorised N(0, 0.5) prior (spec 2, the paper's analytic estimate)."""
  return 0.1 / (2. + jnp.exp(logsnr))


def estimate_x_var(network, params, x, labels, logsnr_fn, num_steps, rng,
                   xvar_frac=0.75):
  """Empirical aDDIM variances on data (Alg. 3): for every sampling time
  t_k = k / num_steps, xvar_frac * E||x_hat(z_t) - x||^2 / d over the batch.

  Returns (num_steps,) float32, indexed like the sampler's steps (i = 0 is
  t = 1).
  """
  x = jnp.asarray(x, jnp.float32)

  def one(i):
    t = 1. - i / num_steps
    a, s = schedules.alpha_sigma(logsnr_fn(t))
    eps = jax.random.normal(jax.random.fold_in(rng, i), x.shape)
    z = a * x + s * eps
    x_hat = ddim.x_from_v(network(params, z, t, labels), z, a, s)
    return xvar_frac * jnp.mean(jnp.square(x_hat - x))

  return jax.lax.map(one, jnp.arange(num_steps))


def diffusion_sample(network, params, noise, labels, logsnr_fn, num_steps,
                     kind='ddim', guidance=0.,
                     condition=conditioning.UNCONDITIONAL, x_var=None,
                     rng=None):
  """Samples a diffusion model with `num_steps` uniform steps from t = 1 to 0.

  `kind` is 'ddim', 'addim' (adjusted DDIM; its variance is the analytic
  0.1 / (2 + SNR) unless `x_var`, one value per step as made by
  `estimate_x_var`, is given) or 'ddpm' (ancestral: each step draws the
  posterior, its noise from `rng`, one key for the batch or one key per
  example). `noise` is z_1 and fixes the batch shape; `condition` says what
  `labels` are (guidance needs its null). Returns the final x prediction
  (z_0 without its tiny sigma_0 noise term). Network evaluations:
  `nfe(num_steps, guidance, condition)`.
  """
  if kind not in ('ddim', 'addim', 'ddpm'):
    raise ValueError(f'Unknown sampler {kind!r}: expected ddim, addim or '
                     'ddpm.')
  if kind == 'ddpm' and rng is None:
    raise ValueError('The ddpm sampler draws noise at every step: pass rng.')
  net = guidance_lib.guided_network(network, guidance, condition)

  def body(i, carry):
    z, _ = carry
    t = 1. - i / num_steps
    s = t - 1. / num_steps
    lt, ls = logsnr_fn(t), logsnr_fn(s)
    (a_t, s_t), (a_s, s_s) = schedules.alpha_sigma(lt), schedules.alpha_sigma(ls)
    x = ddim.x_from_v(net(params, z, t, labels), z, a_t, s_t)
    if kind == 'addim':
      v = analytic_x_var(lt) if x_var is None else x_var[i]
      z = ddim.addim_step(x, z, a_t, s_t, a_s, s_s, v)
    elif kind == 'ddpm':
      z = ddim.ddpm_step(x, z, a_t, s_t, a_s, s_s, _step_noise(rng, i, z))
    else:
      z = ddim.ddim_step(x, z, a_t, s_t, a_s, s_s)
    return z, x

  noise = noise.astype(jnp.float32)
  _, x = jax.lax.fori_loop(0, num_steps, body, (noise, jnp.zeros_like(noise)))
  return x


def _step_noise(rng, i, z):
  """Standard normal noise shaped like z for step i: from one key for the
  batch, or row by row from one key per example (then a sample's noise does
  not depend on its batch)."""
  if rng.ndim == 0:
    return jax.random.normal(jax.random.fold_in(rng, i), z.shape)
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i),
                                              z.shape[1:]))(rng)


def consistency_sample(network, params, noise, labels, logsnr_fn,
                       student_steps):
  """The multistep consistency sampler (Alg. 2): S deterministic DDIM steps
  t = k/S -> (k-1)/S on the student's x prediction, no noise injected, one
  network evaluation each. Never guided: a student distilled from a guided
  teacher has its guidance built in (one student per scale, spec A9).
  Returns the last x prediction."""
  return diffusion_sample(network, params, noise, labels, logsnr_fn,
                          student_steps, 'ddim')


def nfe(num_steps, guidance=0., condition=conditioning.UNCONDITIONAL):
  """Network evaluations of a sampler run: one per step, two when guided
  and the condition conditions."""
  return num_steps * (2 if guidance and condition.conditional else 1)


@dataclasses.dataclass(frozen=True)
class Kind:
  """A row of the sampler table: `sample(network, params, noise, labels,
  logsnr_fn, steps, guidance, condition, rng) -> x`; `guidable`: whether it
  takes classifier-free guidance."""
  sample: Callable
  guidable: bool = True


def _diffusion(kind):
  def sample(network, params, noise, labels, logsnr_fn, steps, guidance,
             condition, rng):
    return diffusion_sample(network, params, noise, labels, logsnr_fn, steps,
                            kind, guidance, condition, rng=rng)
  return sample


def _student(network, params, noise, labels, logsnr_fn, steps, guidance,
             condition, rng):
  del guidance, condition, rng  # A student is never guided.
  return consistency_sample(network, params, noise, labels, logsnr_fn, steps)


KINDS = {
    'student': Kind(_student, guidable=False),
    'ddim': Kind(_diffusion('ddim')),
    'addim': Kind(_diffusion('addim')),
    'ddpm': Kind(_diffusion('ddpm')),
}


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """How to sample: a `kind` of `KINDS` ('student': `consistency_sample`,
  S = `steps`, unguided; or a diffusion sampler, 'ddim', 'addim' with the
  analytic variance, or the ancestral 'ddpm'), with `steps` and
  classifier-free `guidance` w."""
  kind: str
  steps: int
  guidance: float = 0.

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'Unknown sampler {self.kind!r}: expected one of '
                       f'{", ".join(KINDS)}.')
    if self.steps < 1:
      raise ValueError(f'A sampler needs at least one step, not {self.steps}.')
    if self.guidance and not KINDS[self.kind].guidable:
      raise ValueError('A student is sampled unguided: its guidance was fixed '
                       'at distillation.')

  def __call__(self, network, params, noise, labels, logsnr_fn,
               condition=conditioning.UNCONDITIONAL, rng=None):
    """Samples; `rng` is needed by the ancestral sampler only."""
    return KINDS[self.kind].sample(network, params, noise, labels, logsnr_fn,
                                   self.steps, self.guidance, condition, rng)

  def nfe(self, condition=conditioning.UNCONDITIONAL):
    """Network evaluations per sample."""
    return nfe(self.steps, self.guidance, condition)

  @property
  def name(self):
    return f'{self.kind}{self.steps}'
