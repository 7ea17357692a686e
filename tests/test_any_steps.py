"""One student for every step count: the network told its segment's
boundary, Algorithm 1 with S drawn per example, sampling at any S."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from multistep_cm import conditioning
from multistep_cm import datasets
from multistep_cm import errors
from multistep_cm import losses
from multistep_cm import models
from multistep_cm import run as run_lib
from multistep_cm import samplers
from multistep_cm import schedules
from multistep_cm import train
from multistep_cm.core import checkpoint
from multistep_cm.core import sharding
from multistep_cm.core import stages
from multistep_cm.core import state as state_lib
from multistep_cm.evaluation import evaluate as evaluation
from multistep_cm.evaluation import reports

B = 64
CONDITION = conditioning.ClassLabels(4)


def _mlp(seed=0):
  """A random any-S MLP: every parameter jittered, the boundary's zero
  projection too, so its output depends on the boundary."""
  model = models.MLP(models.MLPConfig(width=32, num_blocks=2, emb_dim=16,
                                      out_channels=3, condition=CONDITION))
  params = model.init(jax.random.key(seed), jnp.zeros((1, 3)), jnp.zeros(1),
                      jnp.zeros(1, jnp.int32), boundary=jnp.zeros(1))['params']
  params = jax.tree.map(
      lambda p: p + 0.1 * jax.random.normal(jax.random.key(seed + 1), p.shape),
      params)
  return models.network_fn(model), params


def _batch(seed=0):
  kx, kl = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(kx, (B, 3)),
          jax.random.randint(kl, (B,), 0, CONDITION.num_classes))


def _loss(net, params, steps, mode='ct', iteration=300, teacher=None,
          options=()):
  x, labels = _batch()
  o = losses.ConsistencyOptions(mode=mode, condition=CONDITION,
                                anneal_steps=1000, **dict(options))
  return losses.consistency_loss(net, params, x, labels, jax.random.key(3),
                                 schedules.cosine_logsnr, steps, iteration, o,
                                 teacher=teacher, teacher_params=params)


@pytest.mark.parametrize('mode', ['ct', 'cd'])
def test_one_step_count_is_the_per_s_loss(mode):
  """any_steps = (S,) draws what a student of S draws, and at the same
  draws its loss is the per-S loss exactly for a network that does not
  read the boundary; the boundary it is told is the lower end of each
  example's segment, the same at both of its evaluations."""
  net, params = _mlp()
  teacher = net if mode == 'cd' else None
  for s in (1, 4):
    calls = {}

    def recording(key, p, z, t, c, rng=None, boundary=None):
      calls.setdefault(key, []).append((z, t, boundary))
      return net(p, z, t, c, rng)
    per_s, aux = _loss(functools.partial(recording, 'per_s'), params, s,
                       mode, teacher=teacher)
    any_s, any_aux = _loss(functools.partial(recording, 'any'), params,
                           (s,), mode, teacher=teacher)
    n = float(losses.teacher_step_count(300, anneal_steps=1000))
    assert int(aux['n_seg']) == max(1, round(n / s))
    assert float(any_aux['teacher_steps']) == round(n)
    # The same segments and grid times; XLA divides by one total and by a
    # total per example to within float32's last digit, not always to it.
    (z_ref, s_time, b_ref), (z_t, t, b_hat) = calls['any']
    (_, per_s_time, none), (_, per_t, _) = calls['per_s']
    assert none is None
    np.testing.assert_allclose(t, per_t, rtol=2e-7)
    np.testing.assert_allclose(s_time, per_s_time, rtol=2e-7, atol=1e-7)
    np.testing.assert_allclose(any_s, per_s, rtol=1e-6)
    np.testing.assert_array_equal(b_ref, b_hat)
    np.testing.assert_allclose(b_hat, losses.segment_of(t, s) / s, atol=1e-6)
    assert np.all(b_hat <= s_time + 1e-6) and np.all(t > b_hat)

    # At fixed draws, the terms of Algorithm 1 are the per-S ones exactly.
    x, labels = _batch()
    eps = jax.random.normal(jax.random.key(5), x.shape)
    terms = [losses.consistency_loss_terms(
        fn, params, params, x, labels, eps, t, s_time, b_hat,
        schedules.cosine_logsnr, jax.random.key(6), mode, teacher,
        params, condition=CONDITION, any_steps=any_steps)
             for fn, any_steps in ((net, False), (recording_none(net), True))]
    np.testing.assert_array_equal(*terms)


def recording_none(net):
  """`net`, taking a boundary it ignores."""
  def fn(p, z, t, c, rng=None, boundary=None):
    assert boundary is not None
    return net(p, z, t, c, rng)
  return fn


def test_the_boundary_changes_the_loss():
  """The student reads its boundary: the any-S loss of a network whose
  boundary projection is not zero differs from the per-S one."""
  net, params = _mlp()
  np.testing.assert_raises(AssertionError, np.testing.assert_allclose,
                           _loss(net, params, (4,))[0],
                           _loss(net, params, 4)[0])


def test_each_example_draws_its_step_count_and_times_on_its_grid():
  steps, weights = (1, 2, 4, 8, 16), (1., 1., 2., 0., 4.)
  s = losses.draw_steps(jax.random.key(0), 40_000, steps, weights)
  freq = [float(jnp.mean(s == k)) for k in steps]
  np.testing.assert_allclose(freq, np.array(weights) / sum(weights),
                             atol=0.01)
  s = losses.draw_steps(jax.random.key(1), 40_000, steps)  # Uniform.
  np.testing.assert_allclose([float(jnp.mean(s == k)) for k in steps],
                             0.2, atol=0.01)
  n_seg, total = losses.segment_grid(100_000, s)  # N = 1280 for every S.
  np.testing.assert_array_equal(total, np.maximum(1, np.round(1280 / s)) * s)
  t, u, t_step = losses.sample_times(jax.random.key(2), s.shape[0], s, n_seg)
  np.testing.assert_allclose(t - u, 1. / total, atol=1e-6)
  np.testing.assert_allclose(t_step, losses.segment_of(t, s) / s, atol=1e-6)
  assert np.all(t > t_step) and np.all(t <= t_step + 1. / s + 1e-6)
  # Every segment of every S is drawn.
  for k in steps:
    assert len(np.unique(np.asarray(t_step[s == k]))) == k


@pytest.mark.parametrize('steps,weights,match', [
    ((), (), 'distinct step counts'), ((0, 2), (), 'distinct step counts'),
    ((2, 2), (), 'distinct step counts'), ((1, 2), (1.,), 'one weight'),
    ((1, 2), (0., 0.), 'one weight'), ((1, 2), (1., -1.), 'one weight')])
def test_bad_step_counts_are_one_line(steps, weights, match):
  with pytest.raises(ValueError, match=match):
    losses.check_any_steps(steps, weights)


def test_any_s_sampler_tells_each_step_its_boundary():
  seen = []

  def net(params, z, t, labels, rng=None, boundary=None):
    seen.append((float(t), float(boundary)))
    return jnp.zeros_like(z)
  for s in (1, 3, 8):
    seen.clear()
    spec = samplers.SamplerSpec('any_student', s)
    with jax.disable_jit():
      spec(net, None, jnp.ones((2, 3)), jnp.zeros(2, int),
           schedules.cosine_logsnr)
    assert len(seen) == s == spec.nfe()
    np.testing.assert_allclose(seen, [((s - k) / s, (s - k - 1) / s)
                                      for k in range(s)], atol=1e-6)
  with pytest.raises(ValueError, match='unguided'):
    samplers.SamplerSpec('any_student', 4, guidance=1.)


def _student(teacher_dir, arg='', stage='cd'):
  config = digits.get_config(f'smoke,stage={stage},any{arg}')
  config.teacher_checkpoint = teacher_dir
  return config


def test_student_starts_exactly_as_its_teacher(digits_teacher, tmp_path):
  """The teacher's weights, and a boundary embedding whose output is zero:
  given any boundary, the student's network is the teacher's."""
  teacher_config, teacher_dir = digits_teacher
  run = run_lib.resolve(_student(teacher_dir))
  params = state_lib.load_teacher(run)
  teacher = run_lib.resolve(teacher_config)
  teacher_params = state_lib.load_params(teacher, teacher_dir)[0]
  assert set(params) - set(teacher_params) == {models.BOUNDARY}
  for a, b in zip(jax.tree.leaves({k: params[k] for k in teacher_params}),
                  jax.tree.leaves(teacher_params)):
    np.testing.assert_array_equal(a, b)
  z = jax.random.normal(jax.random.key(0), (8, 8, 8, 1))
  t = jnp.linspace(0.1, 1., 8)
  labels = jnp.arange(8) % 10
  want = teacher.network(teacher_params, z, t, labels)
  for boundary in (jnp.zeros(8), t - 1. / 3, t / 2):
    np.testing.assert_array_equal(
        run.network(params, z, t, labels, boundary=boundary), want)
  # And the train state starts there, EMA included.
  ckpt = checkpoint.Checkpointer(tmp_path / 'checkpoints', 1, 1)
  state, _ = state_lib.restore_or_init(
      run, state_lib.make_optimizer(run.config.optim), ckpt, params)
  for a, b in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('stage', ['cd', 'ct'])
def test_any_s_students_train_and_sample_at_any_s(digits_teacher, tmp_path,
                                                   stage):
  config = _student(digits_teacher[1], ',steps=3', stage)
  state, scores = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == config.total_steps
  assert np.isfinite(scores['fd_digits'])
  # The boundary's projection learned: the student now reads its boundary.
  head = state.params[models.BOUNDARY]['Dense_1']['kernel']
  assert float(jnp.abs(head).max()) > 0
  assert stages.get(stage).run_key(config) == f'{stage}_any'


def test_the_train_step_compiles_once_whatever_s_is_drawn(
    digits_teacher, count_compiles, fresh_train_step):
  config = _student(digits_teacher[1])
  config.consistency.anneal_steps = 4  # N changes at every step too.
  mesh, state, step_fn = fresh_train_step(config)
  teacher = jax.tree.map(jnp.copy, state.params)
  batches = datasets.train_batches(config, config.batch_size, 0)
  step = lambda s: step_fn(s, sharding.global_batch(next(batches), mesh),
                           teacher)
  state, _ = step(state)  # The first call compiles.
  with count_compiles() as compiles:
    for _ in range(4):
      state, out = step(state)
  assert not compiles, compiles
  assert np.isfinite(float(out['loss']))


def test_sampling_picks_s_and_notices_untrained_ones(caplog):
  # S = 5: no other test samples it (the notice is once per process).
  config = digits.get_config('smoke,stage=cd,any,steps=5')
  cd = stages.get('cd')
  assert cd.sampler(config) == samplers.SamplerSpec('any_student', 5)
  assert 'S=5 was not among' in caplog.text
  assert cd.label(config).endswith('S=5 (not trained)')
  caplog.clear()
  config.student_steps = 4
  assert cd.sampler(config).steps == 4 and 'S=4' not in caplog.text
  assert not cd.label(config).endswith('(not trained)')
  # config.evaluate's 'student' is the any-S sampler for an any-S student.
  config.evaluate.sampler, config.evaluate.steps = 'student', 6
  assert stages.evaluation_sampler(config) == samplers.SamplerSpec(
      'any_student', 6)
  for steps in (0, -2):
    config.evaluate.steps = steps
    config.student_steps = steps
    with pytest.raises(errors.ConfigError,
                       match='config.student_steps: A sampler needs at least '
                       'one step'):
      cd.sampler(config)
  per_s = digits.get_config('smoke,stage=cd,steps=3')
  with pytest.raises(errors.ConfigError, match='needs an any-S student'):
    cd.sampler(per_s, 'any_student')


@pytest.mark.parametrize('arg,overrides,match', [
    ('stage=teacher', {'any_steps': (1, 2)}, "stage 'teacher' trains no"),
    ('stage=pd', {'any_steps': (1, 2)}, "stage 'pd' trains no"),
    ('stage=cd,any', {'any_steps_weights': (1., 2.)},
     'config.any_steps_weights'),
    ('stage=ct', {'any_steps': (2, 0)}, 'config.any_steps'),
])
def test_config_mistakes_are_one_line(arg, overrides, match):
  config = digits.get_config(f'smoke,{arg}')
  config.update(overrides)
  with pytest.raises(errors.ConfigError, match=match):
    run_lib.resolve(config)


def test_the_any_argument_is_for_consistency_students():
  assert digits.get_config('stage=cd,any').any_steps == (1, 2, 4, 8, 16)
  assert digits.get_config('any').any_steps == ()  # The pipeline's teacher.
  with pytest.raises(ValueError, match="stage 'pd' trains no any-S"):
    digits.get_config('stage=pd,any')


def test_a_config_without_any_steps_is_a_student_of_one_s(digits_teacher):
  config = digits.get_config('smoke,stage=cd,steps=3')
  config.teacher_checkpoint = digits_teacher[1]
  run = run_lib.resolve(config)
  assert not run.boundary and run.any_steps == ()
  assert models.BOUNDARY not in state_lib.load_teacher(run)
  assert stages.get('cd').sampler(config) == samplers.SamplerSpec('student',
                                                                  3)


def test_the_loss_reaches_the_boundary_through_a_plain_function():
  """Other code passes any network taking `boundary`: a closed-form one."""
  def net(params, z, t, cond, rng=None, boundary=None):
    del params, t, cond, rng
    b = 0. if boundary is None else boundary
    return z * (1. + jnp.reshape(b, (-1, 1)))
  per_s = functools.partial(_loss, net, None)
  assert float(per_s((8,))[0]) != float(per_s(8)[0])


def test_an_evaluation_records_the_step_counts_learned():
  ev = run_lib.resolve(digits.get_config('smoke,stage=cd,any,steps=5'))
  p = evaluation.protocol(ev, 0)
  assert (p['sampler'], p['steps'], p['trained_steps']) == (
      'any_student', 5, [1, 2, 4, 8, 16])
  per_s = evaluation.protocol(
      run_lib.resolve(digits.get_config('smoke,stage=cd,steps=5')), 0)
  assert per_s['sampler'] == 'student' and 'trained_steps' not in per_s


def test_the_pipeline_s_table_has_a_row_per_s(digits_teacher, tmp_path):
  """The comparison of an any-S student: a row for each S it learned and
  one for its own S (here untrained), then the teacher's."""
  teacher_config, teacher_dir = digits_teacher
  config = _student(teacher_dir, ',steps=3')
  config.any_steps = (1, 2)
  run = run_lib.resolve(config)
  state, _ = state_lib.init_state(run, state_lib.make_optimizer(config.optim))
  ckpt = checkpoint.Checkpointer(tmp_path / 'cd_any' / 'checkpoints', 1, 1)
  ckpt.save(1, state, force=True)
  ckpt.close()
  rows = reports.compare(teacher_config, teacher_dir, run,
                         str(tmp_path / 'cd_any'), str(tmp_path))
  assert [(r['name'], r['sampler'], r['nfe']) for r in rows[:3]] == [
      ('student (CD any-S, S=1)', 'any_student', 1),
      ('student (CD any-S, S=2)', 'any_student', 2),
      ('student (CD any-S, S=3, not trained)', 'any_student', 3)]
  assert rows[3]['name'].startswith('teacher')
