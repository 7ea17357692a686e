"""Samplers. Each runs its whole loop as one `lax.fori_loop`, so a sampler is
a single compiled program whatever its step count; jit it with the batch
sharded over the mesh to sample on many devices.

`KINDS` is the table of samplers (the student's, an any-S student's,
DDIM, aDDIM, ancestral DDPM); `SamplerSpec` names one of them, its steps and guidance: the one value
the framework passes around to say how to sample. A sampler is one row of
`KINDS`, its step (or whole loop) and every fact the framework reads of it;
code outside the package adds one by adding a row.
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


def estimate_x_var(network, params, x, cond, logsnr_fn, num_steps, rng,
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
    x_hat = ddim.x_from_v(network(params, z, t, cond), z, a, s)
    return xvar_frac * jnp.mean(jnp.square(x_hat - x))

  return jax.lax.map(one, jnp.arange(num_steps))


def diffusion_sample(network, params, noise, cond, logsnr_fn, num_steps,
                     kind='ddim', guidance=0.,
                     condition=conditioning.UNCONDITIONAL, x_var=None,
                     rng=None):
  """Samples a diffusion model with `num_steps` uniform steps from t = 1 to 0,
  each the `step` of `kind`'s row of `KINDS`.

  `kind` is 'ddim', 'addim' (adjusted DDIM; its variance is the analytic
  0.1 / (2 + SNR) unless `x_var`, one value per step as made by
  `estimate_x_var`, is given) or 'ddpm' (ancestral: each step draws the
  posterior, its noise from `rng`, one key for the batch or one key per
  example). `noise` is z_1 and fixes the batch shape; `condition` says what
  `cond` is (guidance needs its null). Returns the final x prediction
  (z_0 without its tiny sigma_0 noise term). Network evaluations:
  `nfe(num_steps, guidance, condition)`.
  """
  row = KINDS.get(kind)
  if row is None or row.step is None:
    raise ValueError(f'Unknown sampler {kind!r}: expected one of '
                     f'{", ".join(k for k, r in KINDS.items() if r.step)}.')
  if row.stochastic and rng is None:
    raise ValueError(f'The {kind} sampler draws noise at every step: pass '
                     'rng.')
  net = guidance_lib.guided_network(network, guidance, condition)

  def body(i, carry):
    z, _ = carry
    t = 1. - i / num_steps
    s = t - 1. / num_steps
    lt, ls = logsnr_fn(t), logsnr_fn(s)
    (a_t, s_t), (a_s, s_s) = schedules.alpha_sigma(lt), schedules.alpha_sigma(ls)
    x = ddim.x_from_v(net(params, z, t, cond), z, a_t, s_t)
    z = row.step(x, z, a_t, s_t, a_s, s_s, i=i, logsnr=lt, x_var=x_var,
                 noise=_step_noise(rng, i, z) if row.stochastic else None)
    return z, x

  noise = noise.astype(jnp.float32)
  _, x = jax.lax.fori_loop(0, num_steps, body, (noise, jnp.zeros_like(noise)))
  return x


def _ddim_step(x, z, a_t, s_t, a_s, s_s, **_):
  return ddim.ddim_step(x, z, a_t, s_t, a_s, s_s)


def _addim_step(x, z, a_t, s_t, a_s, s_s, *, i, logsnr, x_var, **_):
  v = analytic_x_var(logsnr) if x_var is None else x_var[i]
  return ddim.addim_step(x, z, a_t, s_t, a_s, s_s, v)


def _ddpm_step(x, z, a_t, s_t, a_s, s_s, *, noise, **_):
  return ddim.ddpm_step(x, z, a_t, s_t, a_s, s_s, noise)


def _step_noise(rng, i, z):
  """Standard normal noise shaped like z for step i: from one key for the
  batch, or row by row from one key per example (then a sample's noise does
  not depend on its batch)."""
  if rng.ndim == 0:
    return jax.random.normal(jax.random.fold_in(rng, i), z.shape)
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i),
                                              z.shape[1:]))(rng)


def consistency_sample(network, params, noise, cond, logsnr_fn,
                       student_steps, any_steps=False):
  """The multistep consistency sampler (Alg. 2): S deterministic DDIM steps
  t = k/S -> (k-1)/S on the student's x prediction, no noise injected, one
  network evaluation each. Never guided: a student distilled from a guided
  teacher has its guidance built in (one student per scale, spec A9).
  `any_steps`: the network is an any-S student, told at each step the
  boundary (k-1)/S it steps to. Returns the last x prediction."""
  def told_boundary(p, z, t, c, rng=None):
    # s = t - 1/S as diffusion_sample computes it: the step's end.
    return network(p, z, t, c, rng, boundary=t - 1. / student_steps)
  return diffusion_sample(told_boundary if any_steps else network, params,
                          noise, cond, logsnr_fn, student_steps, 'ddim')


def nfe(num_steps, guidance=0., condition=conditioning.UNCONDITIONAL):
  """Network evaluations of a sampler run: one per step, two when guided
  and the condition conditions."""
  return num_steps * (2 if guidance and condition.conditional else 1)


@dataclasses.dataclass(frozen=True)
class Kind:
  """A row of the sampler table: all the framework knows of a sampler.

  A diffusion sampler gives its `step`, `(x, z_t, alpha_t, sigma_t, alpha_s,
  sigma_s, *, i, logsnr, x_var, noise) -> z_s` (step i, from t to s = t -
  1 / steps, given the x prediction at t), which `diffusion_sample` runs;
  any other gives its whole `sample(network, params, noise, cond,
  logsnr_fn, steps, guidance, condition, rng) -> x`. `label`: its name in
  the reports' tables. `guidable`: it takes classifier-free guidance.
  `stochastic`: it draws noise at every step (standard normal, as `noise`,
  for a step), so it needs keys: an exported program takes them.
  `evaluations`: network evaluations per step, unguided (1 for a `step`,
  which is given one prediction)."""
  label: str
  step: Callable | None = None
  sample: Callable | None = None
  guidable: bool = True
  stochastic: bool = False
  evaluations: int = 1


def _student(any_steps):
  def sample(network, params, noise, cond, logsnr_fn, steps, guidance,
             condition, rng):
    del guidance, condition, rng  # A student is never guided.
    return consistency_sample(network, params, noise, cond, logsnr_fn, steps,
                              any_steps)
  return sample


KINDS = {
    'student': Kind('student', sample=_student(False), guidable=False),
    'any_student': Kind('any-S student', sample=_student(True),
                        guidable=False),
    'ddim': Kind('DDIM', _ddim_step),
    'addim': Kind('aDDIM', _addim_step),
    'ddpm': Kind('DDPM', _ddpm_step, stochastic=True),
}


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """How to sample: a `kind` of `KINDS` ('student': `consistency_sample`,
  S = `steps`, unguided; 'any_student' the same for an any-S student; or a
  diffusion sampler, 'ddim', 'addim' with the analytic variance, or the
  ancestral 'ddpm'), with `steps` and classifier-free `guidance` w."""
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

  def __call__(self, network, params, noise, cond, logsnr_fn,
               condition=conditioning.UNCONDITIONAL, rng=None):
    """Samples; `rng` is needed by a stochastic sampler only."""
    row = KINDS[self.kind]
    if row.sample:
      return row.sample(network, params, noise, cond, logsnr_fn, self.steps,
                        self.guidance, condition, rng)
    return diffusion_sample(network, params, noise, cond, logsnr_fn,
                            self.steps, self.kind, self.guidance, condition,
                            rng=rng)

  def nfe(self, condition=conditioning.UNCONDITIONAL):
    """Network evaluations per sample."""
    return KINDS[self.kind].evaluations * nfe(self.steps, self.guidance,
                                              condition)

  @property
  def name(self):
    return f'{self.kind}{self.steps}'

  @property
  def stochastic(self):
    """Whether it draws noise at every step, from keys it is given."""
    return KINDS[self.kind].stochastic

  @property
  def label(self):
    """Its name in the reports' tables."""
    return f'{KINDS[self.kind].label} {self.steps}'
