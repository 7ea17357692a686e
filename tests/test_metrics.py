import numpy as np

from multistep_cm import toy2d
from multistep_cm.datasets import digits as digits_data
from multistep_cm.evaluation import digits_classifier
from multistep_cm.evaluation import metrics


def test_digits_classifier_accuracy():
  x, y = digits_data.load('test')
  assert digits_classifier.accuracy(x, y) >= 0.95


def test_digits_classifier_is_reproducible():
  # The shipped weights are what the training script makes (a few hundred
  # steps suffice to tell the procedure is the same one).
  params = digits_classifier.train(steps=300)
  x, y = digits_data.load('test')
  assert digits_classifier.accuracy(x, y, params) > 0.9


def test_fd_digits_separates_real_from_noise():
  floor = digits_classifier.floor()
  noise = np.random.default_rng(0).uniform(-1, 1, (360, 8, 8, 1))
  bad = digits_classifier.evaluate(noise.astype(np.float32),
                                   np.zeros(360, np.int32))
  assert floor['fd_digits'] < 10 < bad['fd_digits']
  assert floor['class_accuracy'] > 0.95 and bad['class_accuracy'] < 0.3


def test_frechet_distance_closed_forms():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((5, 5))
  cov = a @ a.T + np.eye(5)
  mu = rng.standard_normal(5)
  assert abs(metrics.frechet_distance(mu, cov, mu, cov)) < 1e-6
  # Diagonal covariances: sum (m1 - m2)^2 + (s1 - s2)^2.
  s1, s2 = np.array([1., 2., 3.]), np.array([2., 2., 1.])
  m1, m2 = np.zeros(3), np.array([1., 0., 2.])
  want = np.sum((m1 - m2)**2) + np.sum((s1 - s2)**2)
  got = metrics.frechet_distance(m1, np.diag(s1**2), m2, np.diag(s2**2))
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_toy2d_metrics():
  x, _ = toy2d.sample(np.random.default_rng(5), 2000)
  good = metrics.toy2d_metrics(x)
  blurred = metrics.toy2d_metrics(x * 0.8)
  # True samples score ~0.08 (sampling noise at n = 2000); shrinking the
  # mixture by 20% moves its modes by 0.4 and scores ~0.3.
  assert good['swd'] < 0.15 < blurred['swd']
  assert good['log_density'] > blurred['log_density']


def test_fd_digits_needs_the_held_out_count():
  x, y = digits_data.load('test')
  assert set(digits_classifier.evaluate(x[:100], y[:100])) == {'class_accuracy'}
