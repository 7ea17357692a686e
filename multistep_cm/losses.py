"""Training losses. Networks enter as plain functions
`(params, z_t, t, cond, rng) -> v_prediction` (see `models.network_fn`);
what `cond` is, its null and its dropout, a `conditioning.Condition` says.
Each loss checks, at trace time, that `cond` is of `condition`'s kind and
that guidance or label dropout has a null to use: a one-line ValueError."""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from multistep_cm import conditioning
from multistep_cm import ddim
from multistep_cm import guidance as guidance_lib
from multistep_cm import schedules


def _mean_per_example(x):
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _avg_pool2(x):
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _forward_process(k_t, k_eps, x, logsnr_fn):
  """(t ~ U(0, 1), eps, alpha and sigma shaped to broadcast over x, z_t) per
  example: the noising of the diffusion loss."""
  batch = x.shape[0]
  t = jax.random.uniform(k_t, (batch,))
  eps = jax.random.normal(k_eps, x.shape)
  alpha, sigma = schedules.alpha_sigma(logsnr_fn(t))
  a = alpha.reshape((batch,) + (1,) * (x.ndim - 1))
  s = sigma.reshape(a.shape)
  return t, eps, a, s, a * x + s * eps


def diffusion_loss(network, params, x, cond, rng, logsnr_fn,
                   label_dropout=0., condition=conditioning.UNCONDITIONAL,
                   multiscale=0):
  """Continuous-time diffusion loss with t ~ U(0, 1) and the v-loss weighting.

  (SNR(t) + 1) ||x_hat - x||^2 equals ||v_hat - v||^2 exactly, so the loss is
  the mean squared v error. `multiscale` (an int; True is 1) adds that many
  levels of simple diffusion's multiscale loss: the error is also measured
  after 1, 2, ... successive 2x2 average pools, and the per-pixel means of
  all levels are averaged with equal weights; the pooled error is the error
  of the pooled v because pooling is linear. `label_dropout` replaces the
  condition of that fraction of examples by its null (`condition.drop`).

  Returns the scalar loss averaged over the batch.
  """
  conditioning.check_guidance(condition, label_dropout=label_dropout)
  condition.check(cond, x.shape[0])
  k_t, k_eps, k_label, k_drop = jax.random.split(rng, 4)
  x = x.astype(jnp.float32)
  t, eps, a, s, z_t = _forward_process(k_t, k_eps, x, logsnr_fn)
  cond = condition.drop(k_label, cond, label_dropout)
  v_err = network(params, z_t, t, cond, k_drop) - (a * eps - s * x)
  levels = [_mean_per_example(jnp.square(v_err))]
  for _ in range(int(multiscale)):
    v_err = _avg_pool2(v_err)
    levels.append(_mean_per_example(jnp.square(v_err)))
  return jnp.mean(sum(levels) / len(levels))


def guidance_distillation_loss(network, params, teacher, teacher_params, x,
                               cond, rng, logsnr_fn, guidance,
                               condition=conditioning.UNCONDITIONAL):
  """The guidance-distilled teacher of the paper's Table 6: one evaluation of
  the network learns the teacher's classifier-free guided prediction
  (1 + w) cond - w uncond, at the diffusion loss's times and noise: the mean
  squared error to the guided v. Its samples cost half the guided teacher's
  evaluations with any sampler (DDIM in the table)."""
  k_t, k_eps, k_drop = jax.random.split(rng, 3)
  t, _, _, _, z_t = _forward_process(k_t, k_eps, x.astype(jnp.float32),
                                     logsnr_fn)
  target, _ = guidance_lib.guided_v(teacher, teacher_params, z_t, t, cond,
                                    guidance, condition)
  v_err = network(params, z_t, t, cond, k_drop) - jax.lax.stop_gradient(
      target)
  return jnp.mean(_mean_per_example(jnp.square(v_err)))


# ----------------------------------------------------------------------------
# Multistep consistency (Algorithm 1 of the paper, spec section 3).
# ----------------------------------------------------------------------------


def teacher_step_count(iteration, start=64., end=1280., anneal_steps=100_000):
  """N(i): log-linear from `start` to `end` over `anneal_steps`, then constant."""
  frac = jnp.clip(jnp.asarray(iteration, jnp.float32) / anneal_steps, 0., 1.)
  return jnp.exp(jnp.log(start) + frac * (jnp.log(end) - jnp.log(start)))


def segment_grid(iteration, student_steps, start=64., end=1280.,
                 anneal_steps=100_000):
  """(n_seg, T): teacher steps per segment, round(N / S) and at least 1, and
  the total T = n_seg S. Traced int32, so annealing never recompiles."""
  n = teacher_step_count(iteration, start, end, anneal_steps)
  n_seg = jnp.maximum(1, jnp.round(n / student_steps)).astype(jnp.int32)
  return n_seg, n_seg * student_steps


def segment_of(t, student_steps):
  """The segment k of t, with t in (k/S, (k+1)/S]: its top belongs to it."""
  k = jnp.ceil(jnp.asarray(t, jnp.float32) * student_steps) - 1
  return jnp.clip(k, 0, student_steps - 1).astype(jnp.int32)


def sample_times(rng, batch, student_steps, n_seg):
  """Per example: a segment, a grid time t inside it and s = t - 1/T.

  Times are exact grid fractions i/T of integers, so t = k/S lands on the
  segment boundary exactly. `student_steps` and `n_seg` may also be one
  per example (an any-S student's). Returns (t, s, t_step) in float32.
  """
  k_step, k_n = jax.random.split(rng)
  total = (n_seg * student_steps).astype(jnp.float32)
  step = jax.random.randint(k_step, (batch,), 0, student_steps)
  n_rel = jax.random.randint(k_n, (batch,), 1, n_seg + 1)
  i_t = step * n_seg + n_rel
  return i_t / total, (i_t - 1) / total, (step * n_seg) / total


def check_any_steps(steps, weights=()):
  """Raises a one-line ValueError unless `steps` are step counts (each at
  least 1, none twice) and `weights` is empty or one non-negative weight per
  count, not all zero."""
  steps, weights = tuple(steps), tuple(weights)
  if not steps or any(int(s) != s or s < 1 for s in steps) or len(
      set(steps)) != len(steps):
    raise ValueError(f'any_steps {steps}: distinct step counts S >= 1, e.g. '
                     '(1, 2, 4, 8, 16).')
  if weights and (len(weights) != len(steps) or min(weights) < 0 or
                  not sum(weights) > 0):
    raise ValueError(f'any_steps_weights {weights}: one weight >= 0 per step '
                     f'count of {steps} (not all 0), or () for uniform.')


def draw_steps(rng, batch, steps, weights=()):
  """Per example, a step count S of `steps` drawn with probabilities
  proportional to `weights` (uniform when empty): (batch,) int32."""
  check_any_steps(steps, weights)
  p = None if not weights else jnp.asarray(weights, jnp.float32) / sum(
      weights)
  index = jax.random.choice(rng, len(steps), (batch,), p=p)
  return jnp.asarray(steps, jnp.int32)[index]


def _huber(m, delta):
  """sqrt(m + delta^2) - delta, written m / (sqrt(m + delta^2) + delta): the
  same value without the cancellation that loses float32 digits when m is
  small next to delta^2 (delta = 1, the text-to-image setting). delta = 0 is
  the plain norm sqrt(m), its gradient taken as 0 at m = 0 (that form would
  divide 0 by 0 there)."""
  if delta == 0:
    positive = m > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, m, 1.)), 0.)
  return m / (jnp.sqrt(m + delta**2) + delta)


def pseudo_huber(err, delta, norm='rms'):
  """sqrt(||e||^2 + delta^2) - delta per example: an l2 (not squared) distance
  made smooth at 0 (delta = 0: the plain l2 norm; delta < 0 is an error).
  `norm`: 'rms' normalises ||e||^2 by the dimension (spec A1, the default),
  'sum' does not, 'elementwise' applies it per dimension and averages (close
  to l1 for small delta; for comparison only)."""
  if delta < 0:
    raise ValueError(f'huber_delta must be >= 0, not {delta}.')
  sq = jnp.square(err)
  if norm == 'rms':
    return _huber(_mean_per_example(sq), delta)
  if norm == 'sum':
    return _huber(jnp.sum(sq, axis=tuple(range(1, err.ndim))), delta)
  if norm == 'elementwise':
    return _mean_per_example(_huber(sq, delta))
  raise ValueError(f'Unknown norm {norm!r}: expected rms, sum or elementwise.')


def _ab(logsnr_fn, t):
  return schedules.alpha_sigma(logsnr_fn(t))


def _x_pred(network, params, z, t, cond, rng, logsnr_fn):
  alpha, sigma = _ab(logsnr_fn, t)
  return ddim.x_from_v(network(params, z, t, cond, rng), z, alpha, sigma)


def teacher_x(teacher, teacher_params, z, t, cond, logsnr_fn, guidance=0.,
              condition=conditioning.UNCONDITIONAL):
  """The teacher's x prediction (guided when `guidance` > 0) and its plain
  conditional prediction, which sets the aDDIM variance (spec A9). Dropout off."""
  alpha, sigma = _ab(logsnr_fn, t)
  guided, plain = guidance_lib.guided_v(teacher, teacher_params, z, t, cond,
                                        guidance, condition)
  return (ddim.x_from_v(guided, z, alpha, sigma),
          ddim.x_from_v(plain, z, alpha, sigma))


def teacher_addim_step(teacher, teacher_params, z_t, t, s, x, cond,
                       logsnr_fn, xvar_frac=0.75, guidance=0.,
                       condition=conditioning.UNCONDITIONAL):
  """One aDDIM step z_t -> z_s of the teacher, its x variance xvar_frac times
  the per-example error of the conditional prediction against the data x
  (spec section 3): the step both CD and PD distil."""
  x_tea, x_cond = teacher_x(teacher, teacher_params, z_t, t, cond, logsnr_fn,
                            guidance, condition)
  x_var = xvar_frac * _mean_per_example(jnp.square(x_cond - x))
  return ddim.addim_step(x_tea, z_t, *_ab(logsnr_fn, t), *_ab(logsnr_fn, s),
                         x_var)


def consistency_loss_terms(student, params, target_params, x, cond, eps, t,
                           s, t_step, logsnr_fn, dropout_rng=None, mode='cd',
                           teacher=None, teacher_params=None, xvar_frac=0.75,
                           huber_delta=1e-4, norm='rms',
                           weighting='snr_plus_one', guidance=0.,
                           condition=conditioning.UNCONDITIONAL,
                           any_steps=False):
  """Per-example multistep consistency loss for given draws (Alg. 1, 4-12).

  `t`, `s`, `t_step` are (batch,) times with s = t - 1/T and t_step the
  segment's lower boundary. `mode` 'cd' steps z_t -> z_s with aDDIM on the
  teacher's prediction; 'ct' uses the forward process with the same eps. The
  reference comes from `target_params` (the student's own parameters, or
  their EMA) under stop-gradient, with the same dropout rng as the student
  ("synchronized dropout"). Target construction is float32. `any_steps`:
  the student is an any-S student, told t_step (its `boundary`) at both
  of its evaluations; the teacher never is.
  """
  # CT never reaches guided_v, which checks CD's guidance and condition.
  conditioning.check_guidance(condition, guidance)
  condition.check(cond, x.shape[0])
  x = x.astype(jnp.float32)
  (a_t, s_t), (a_s, s_s), (a_0, s_0) = (_ab(logsnr_fn, u) for u in (t, s,
                                                                    t_step))
  e = lambda c: c.reshape(c.shape + (1,) * (x.ndim - 1))
  z_t = e(a_t) * x + e(s_t) * eps
  if mode == 'cd':
    z_s = teacher_addim_step(teacher, teacher_params, z_t, t, s, x, cond,
                             logsnr_fn, xvar_frac, guidance, condition)
  elif mode == 'ct':
    z_s = e(a_s) * x + e(s_s) * eps
  else:
    raise ValueError(f'Unknown mode {mode!r}: expected cd or ct.')
  z_s = jax.lax.stop_gradient(z_s)

  if any_steps:
    student = functools.partial(student, boundary=t_step)
  x_ref = _x_pred(student, target_params, z_s, s, cond, dropout_rng,
                  logsnr_fn)
  z_ref = ddim.ddim_step(x_ref, z_s, a_s, s_s, a_0, s_0)
  x_tgt = jax.lax.stop_gradient(
      ddim.inverse_ddim(z_ref, z_t, a_t, s_t, a_0, s_0))
  x_hat = _x_pred(student, params, z_t, t, cond, dropout_rng, logsnr_fn)

  snr_plus_one = jnp.exp(logsnr_fn(t)) + 1.
  if weighting == 'snr_plus_one':  # The algorithm box, literally (spec A2).
    return snr_plus_one * pseudo_huber(x_hat - x_tgt, huber_delta, norm)
  if weighting == 'v_space':  # The distance of v predictions instead.
    return pseudo_huber(e(jnp.sqrt(snr_plus_one)) * (x_hat - x_tgt),
                        huber_delta, norm)
  raise ValueError(f'Unknown weighting {weighting!r}: expected snr_plus_one '
                   'or v_space.')


NORMS = ('rms', 'sum', 'elementwise')
WEIGHTINGS = ('snr_plus_one', 'v_space')


@dataclasses.dataclass(frozen=True)
class ConsistencyOptions:
  """The choices of multistep consistency training and distillation (spec
  sections 3 and 8), checked once when built rather than at trace time.

  `mode` 'cd' steps with the teacher's aDDIM, 'ct' with the forward process;
  N, the teacher steps, anneals log-linearly from `anneal_start` to
  `anneal_end` over `anneal_steps` iterations; `xvar_frac` is aDDIM's eta;
  `huber_delta` (>= 0), `norm` (A1) and `weighting` (A2) shape the
  distance; `guidance` guides the CD teacher (A9) with the null of
  `condition`; `label_dropout` replaces the condition of that fraction of
  examples by its null before any network sees it: the student, its target
  and the CD teacher alike. Both need a `condition` with a null: with
  UNCONDITIONAL either is a ValueError. `steps_weights`: how often an any-S
  student draws each of its step counts (uniform when empty).
  """
  mode: str = 'cd'
  anneal_start: float = 64.
  anneal_end: float = 1280.
  anneal_steps: int = 100_000
  xvar_frac: float = 0.75
  huber_delta: float = 1e-4
  norm: str = 'rms'
  weighting: str = 'snr_plus_one'
  guidance: float = 0.
  condition: conditioning.Condition = conditioning.UNCONDITIONAL
  label_dropout: float = 0.
  steps_weights: tuple = ()

  def __post_init__(self):
    for name, value, allowed in (('mode', self.mode, ('cd', 'ct')),
                                 ('norm', self.norm, NORMS),
                                 ('weighting', self.weighting, WEIGHTINGS)):
      if value not in allowed:
        raise ValueError(f'Unknown {name} {value!r}: expected one of '
                         f'{", ".join(allowed)}.')
    if self.guidance and self.mode == 'ct':
      raise ValueError('Guidance needs a teacher: CT has none (use CD).')
    if self.huber_delta < 0:
      raise ValueError(f'huber_delta must be >= 0, not {self.huber_delta}.')
    conditioning.check_guidance(self.condition, self.guidance,
                                self.label_dropout)


def consistency_loss(student, params, x, cond, rng, logsnr_fn,
                     student_steps, iteration, options, target_params=None,
                     teacher=None, teacher_params=None):
  """Algorithm 1: draws segments, grid times and noise, returns the batch
  mean of `consistency_loss_terms` and {'n_seg': teacher steps per segment}.

  `student_steps` is S, or a sequence of step counts: one any-S student
  learns them all, each example drawing its S (`draw_steps`, weighted by
  `options.steps_weights`), its segment and times on that S's grid, the
  teacher's total steps N annealed alike for every S; the student is told
  its segment's boundary. The aux is then {'teacher_steps': N}.
  `options` is a `ConsistencyOptions`; `iteration` may be traced, so N
  anneals without recompiling. `target_params` defaults to `params` (the
  paper's stop-gradient target); the teacher is needed for CD only.
  """
  o = options
  # Before dropout, which would fail less clearly on a cond of another kind.
  o.condition.check(cond, x.shape[0])
  k_t, k_eps, k_label, k_drop = jax.random.split(rng, 4)
  any_steps = isinstance(student_steps, (tuple, list))
  if any_steps:
    # From a key of its own: the other draws are a per-S student's.
    student_steps = draw_steps(jax.random.fold_in(k_t, 1), x.shape[0],
                               student_steps, o.steps_weights)
  n_seg, _ = segment_grid(iteration, student_steps, o.anneal_start,
                          o.anneal_end, o.anneal_steps)
  t, s, t_step = sample_times(k_t, x.shape[0], student_steps, n_seg)
  eps = jax.random.normal(k_eps, x.shape)
  cond = o.condition.drop(k_label, cond, o.label_dropout)
  target = params if target_params is None else target_params
  terms = consistency_loss_terms(
      student, params, target, x, cond, eps, t, s, t_step, logsnr_fn,
      k_drop, mode=o.mode, teacher=teacher, teacher_params=teacher_params,
      xvar_frac=o.xvar_frac, huber_delta=o.huber_delta, norm=o.norm,
      weighting=o.weighting, guidance=o.guidance, condition=o.condition,
      any_steps=any_steps)
  if any_steps:
    return jnp.mean(terms), {'teacher_steps': jnp.round(teacher_step_count(
        iteration, o.anneal_start, o.anneal_end, o.anneal_steps))}
  return jnp.mean(terms), {'n_seg': n_seg}


def multistep_consistency_loss(student, params, x, cond, rng, logsnr_fn,
                               student_steps, iteration, target_params=None,
                               anneal_start=64., anneal_end=1280.,
                               anneal_steps=100_000, label_dropout=0.,
                               teacher=None, teacher_params=None, **options):
  """`consistency_loss` with its options as keyword arguments: the fields of
  `ConsistencyOptions` (mode, xvar_frac, huber_delta, norm, weighting,
  guidance, condition, and those named here)."""
  options = ConsistencyOptions(anneal_start=anneal_start,
                               anneal_end=anneal_end,
                               anneal_steps=anneal_steps,
                               label_dropout=label_dropout, **options)
  return consistency_loss(student, params, x, cond, rng, logsnr_fn,
                          student_steps, iteration, options, target_params,
                          teacher, teacher_params)


def progressive_distillation_loss(student, params, teacher, teacher_params, x,
                                  cond, rng, logsnr_fn, student_steps,
                                  xvar_frac=0.75, guidance=0.,
                                  condition=conditioning.UNCONDITIONAL):
  """Progressive distillation (Salimans & Ho 2022) with an aDDIM teacher, the
  paper's Table 3 baseline: one student step of 1/S matches two teacher
  steps of 1/(2S). Squared error in x, weighted by SNR + 1 (the v-loss).
  """
  k_t, k_eps, k_drop = jax.random.split(rng, 3)
  x = x.astype(jnp.float32)
  b = x.shape[0]
  t = jax.random.randint(k_t, (b,), 1, student_steps + 1) / student_steps
  half = 0.5 / student_steps
  eps = jax.random.normal(k_eps, x.shape)
  (a_t, s_t) = _ab(logsnr_fn, t)
  e = lambda c: c.reshape(c.shape + (1,) * (x.ndim - 1))
  z = e(a_t) * x + e(s_t) * eps
  z_t = z
  for u0, u1 in ((t, t - half), (t - half, t - 2 * half)):
    z = teacher_addim_step(teacher, teacher_params, z, u0, u1, x, cond,
                           logsnr_fn, xvar_frac, guidance, condition)
  a_s, s_s = _ab(logsnr_fn, t - 2 * half)
  x_tgt = jax.lax.stop_gradient(ddim.inverse_ddim(z, z_t, a_t, s_t, a_s, s_s))
  x_hat = _x_pred(student, params, z_t, t, cond, k_drop, logsnr_fn)
  w = jnp.exp(logsnr_fn(t)) + 1.
  return jnp.mean(w * _mean_per_example(jnp.square(x_hat - x_tgt)))
