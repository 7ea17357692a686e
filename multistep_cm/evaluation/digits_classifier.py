"""The digits classifier behind FD-digits and the class accuracy of samples.

An MLP on the 8x8 digits train split. Its 64-d penultimate features give the
Frechet distance "FD-digits" (reference statistics: the train split), and its
predictions the accuracy of class-conditional samples. The weights ship in
`assets/digits_classifier.npz`; regenerate them (deterministically, on CPU) with

  python -m multistep_cm.evaluation.digits_classifier
"""

import functools

from absl import app
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import optax

from multistep_cm.datasets import digits as digits_data
from multistep_cm.evaluation import metrics

WEIGHTS = epath.Path(__file__).parent / 'assets' / 'digits_classifier.npz'
SIZES = (64, 256, 64, 10)
TRAIN_STEPS = 2000
# FD-digits is compared at the held-out split's size (`fd_digits`): fewer
# images than that have no FD-digits.
FD_CHUNK = digits_data.TEST_SIZE


def _forward(params, x):
  """Returns (features, logits) for images of shape (n, 8, 8, 1) in [-1, 1]."""
  h = x.reshape(x.shape[0], -1)
  n = len(SIZES) - 1
  for i in range(n - 1):
    h = jax.nn.gelu(h @ params[f'w{i}'] + params[f'b{i}'])
  return h, h @ params[f'w{n - 1}'] + params[f'b{n - 1}']


def train(seed=0, steps=TRAIN_STEPS):
  """Full-batch AdamW with weight decay and input noise; deterministic."""
  x, y = digits_data.load('train')
  keys = jax.random.split(jax.random.key(seed), len(SIZES))
  params = {}
  for i, (m, n) in enumerate(zip(SIZES[:-1], SIZES[1:])):
    params[f'w{i}'] = jax.random.normal(keys[i], (m, n)) / np.sqrt(m)
    params[f'b{i}'] = jnp.zeros(n)
  opt = optax.adamw(1e-3, weight_decay=1e-3)
  state = opt.init(params)

  @jax.jit
  def step(params, state, key):
    def loss_fn(p):
      # Pixel noise makes the features less brittle to the small artefacts of
      # generated samples.
      xn = x + 0.1 * jax.random.normal(key, x.shape)
      logits = _forward(p, xn)[1]
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    grads = jax.grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for i in range(steps):
    params, state = step(params, state, jax.random.fold_in(keys[-1], i))
  return jax.tree.map(np.asarray, params)


@functools.lru_cache(maxsize=1)
def load(path=WEIGHTS):
  if not path.exists():
    raise FileNotFoundError(
        f'Digits classifier weights not found at {path}; regenerate them with '
        '`python -m multistep_cm.evaluation.digits_classifier`.')
  with path.open('rb') as raw, np.load(raw) as f:
    return {k: jnp.asarray(f[k]) for k in f.files}


_forward_jit = jax.jit(_forward)


def features_and_logits(images, params=None):
  params = load() if params is None else params
  f, logits = _forward_jit(params, jnp.asarray(images, jnp.float32))
  return np.asarray(f), np.asarray(logits)


def accuracy(images, labels, params=None):
  _, logits = features_and_logits(images, params)
  return float(np.mean(np.argmax(logits, -1) == np.asarray(labels)))


@functools.lru_cache(maxsize=1)
def reference_stats():
  """Feature statistics of the digits train split."""
  return metrics.gaussian_stats(
      features_and_logits(digits_data.load('train')[0])[0])


def fd_digits(images):
  """FD-digits of images against the train split. The statistic is biased
  upwards for few images, so compare numbers at equal counts: the held-out
  split has 360, and `evaluate` averages over chunks of that size."""
  mu, sigma = metrics.gaussian_stats(features_and_logits(images)[0])
  return metrics.frechet_distance(mu, sigma, *reference_stats())


def evaluate(images, labels):
  """Class accuracy, and FD-digits (the mean over chunks of the held-out size)
  when there are at least that many images."""
  n = FD_CHUNK
  chunks = [images[i:i + n] for i in range(0, len(images) - n + 1, n)]
  scores = {'class_accuracy': accuracy(images, labels)}
  if chunks:
    scores['fd_digits'] = float(np.mean([fd_digits(c) for c in chunks]))
  return scores


def floor():
  """The scores of real held-out digits: the best a model can hope for."""
  x, y = digits_data.load('test')
  return evaluate(x, y)


def main(argv):
  del argv
  params = train()
  WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
  with WEIGHTS.open('wb') as f:
    np.savez(f, **params)
  x, y = digits_data.load('test')
  print(f'wrote {WEIGHTS}; held-out accuracy {accuracy(x, y, params):.4f}')


if __name__ == '__main__':
  app.run(main)
