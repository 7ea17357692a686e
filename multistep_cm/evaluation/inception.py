"""The FID Inception network: InceptionV3 with the structure and weights of the
TF `inception-2015-12-05` graph, as pytorch-fid ports it.

What differs from the classification InceptionV3 (and matters for FID):
the average pools of Mixed_5x, Mixed_6b-e and Mixed_7b do not count padding,
and Mixed_7c pools its last branch with a max pool. Batch norm uses eps 1e-3.

Input: uint8 (or float in [0, 255]) NHWC RGB images of any size. As inside the
TF graph, they are resized to 299x299 with TF1's bilinear resize (no
half-pixel centres, no antialiasing), then mapped to [-1, 1) as (x - 128) / 128.
Output: the 2048-d `pool_3` features and the 1008-way logits without the
output bias (what the ADM evaluator and StyleGAN's IS use).

Every convolution and matmul runs at HIGHEST precision: the default bf16/TF32
passes of TPUs and GPUs move the features by ~1e-3, more than any port-to-port
difference.

Weights are a `.npz` of float32 arrays named like the parameters here
('Mixed_5b/branch1x1/conv/kernel'), written by `convert_inception`.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from multistep_cm import weights

HIGHEST = jax.lax.Precision.HIGHEST
SIZE = 299
FEATURES = 2048
CLASSES = 1008


class ConvBN(nn.Module):
  """Convolution without bias, batch norm with frozen statistics, ReLU."""
  features: int
  kernel: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel, self.strides,
                padding=((ph, ph), (pw, pw)), use_bias=False, precision=HIGHEST,
                name='conv')(x)
    bn = BatchNorm(self.features, name='bn')
    return nn.relu(bn(x))


class BatchNorm(nn.Module):
  features: int
  eps: float = 1e-3

  @nn.compact
  def __call__(self, x):
    p = {k: self.param(k, init, (self.features,)) for k, init in (
        ('scale', nn.initializers.ones), ('bias', nn.initializers.zeros),
        ('mean', nn.initializers.zeros), ('var', nn.initializers.ones))}
    inv = p['scale'] * jax.lax.rsqrt(p['var'] + self.eps)
    return (x - p['mean']) * inv + p['bias']


def _avg_pool(x):
  """3x3 stride-1 average pool over the unpadded pixels only (the TF graph's
  SAME pooling; torchvision's default counts the zero padding)."""
  return nn.avg_pool(x, (3, 3), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2))


class BlockA(nn.Module):  # Mixed_5b, 5c, 5d.
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = ConvBN(64, (1, 1), name='branch1x1')(x)
    b5 = ConvBN(48, (1, 1), name='branch5x5_1')(x)
    b5 = ConvBN(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
    b3 = ConvBN(64, (1, 1), name='branch3x3dbl_1')(x)
    b3 = ConvBN(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
    b3 = ConvBN(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
    bp = ConvBN(self.pool_features, (1, 1), name='branch_pool')(_avg_pool(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class BlockB(nn.Module):  # Mixed_6a: grid reduction.

  @nn.compact
  def __call__(self, x):
    b3 = ConvBN(384, (3, 3), strides=2, name='branch3x3')(x)
    bd = ConvBN(64, (1, 1), name='branch3x3dbl_1')(x)
    bd = ConvBN(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = ConvBN(96, (3, 3), strides=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_s2(x)], axis=-1)


class BlockC(nn.Module):  # Mixed_6b-e: factorised 7x7 convolutions.
  c7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.c7
    b1 = ConvBN(192, (1, 1), name='branch1x1')(x)
    b7 = ConvBN(c7, (1, 1), name='branch7x7_1')(x)
    b7 = ConvBN(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = ConvBN(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = ConvBN(c7, (1, 1), name='branch7x7dbl_1')(x)
    bd = ConvBN(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = ConvBN(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = ConvBN(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = ConvBN(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = ConvBN(192, (1, 1), name='branch_pool')(_avg_pool(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class BlockD(nn.Module):  # Mixed_7a: grid reduction.

  @nn.compact
  def __call__(self, x):
    b3 = ConvBN(192, (1, 1), name='branch3x3_1')(x)
    b3 = ConvBN(320, (3, 3), strides=2, name='branch3x3_2')(b3)
    b7 = ConvBN(192, (1, 1), name='branch7x7x3_1')(x)
    b7 = ConvBN(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = ConvBN(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = ConvBN(192, (3, 3), strides=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_s2(x)], axis=-1)


class BlockE(nn.Module):  # Mixed_7b (average pool), Mixed_7c (max pool).
  max_pool: bool

  @nn.compact
  def __call__(self, x):
    b1 = ConvBN(320, (1, 1), name='branch1x1')(x)
    b3 = ConvBN(384, (1, 1), name='branch3x3_1')(x)
    b3 = jnp.concatenate([
        ConvBN(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
        ConvBN(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3)], -1)
    bd = ConvBN(448, (1, 1), name='branch3x3dbl_1')(x)
    bd = ConvBN(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([
        ConvBN(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
        ConvBN(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd)], -1)
    if self.max_pool:  # The TF graph's last block; torchvision averages.
      pooled = nn.max_pool(x, (3, 3), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool(x)
    bp = ConvBN(192, (1, 1), name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """(N, 299, 299, 3) in [-1, 1] -> (pool_3 features, logits without bias)."""

  @nn.compact
  def __call__(self, x):
    x = ConvBN(32, (3, 3), strides=2, name='Conv2d_1a_3x3')(x)
    x = ConvBN(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = ConvBN(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
    x = _max_pool_s2(x)
    x = ConvBN(80, (1, 1), name='Conv2d_3b_1x1')(x)
    x = ConvBN(192, (3, 3), name='Conv2d_4a_3x3')(x)
    x = _max_pool_s2(x)
    x = BlockA(32, name='Mixed_5b')(x)
    x = BlockA(64, name='Mixed_5c')(x)
    x = BlockA(64, name='Mixed_5d')(x)
    x = BlockB(name='Mixed_6a')(x)
    for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160),
                     ('Mixed_6e', 192)):
      x = BlockC(c7, name=name)(x)
    x = BlockD(name='Mixed_7a')(x)
    x = BlockE(max_pool=False, name='Mixed_7b')(x)
    x = BlockE(max_pool=True, name='Mixed_7c')(x)
    features = jnp.mean(x, axis=(1, 2))
    kernel = self.param('fc', nn.initializers.lecun_normal(),
                        (FEATURES, CLASSES))
    return features, jnp.dot(features, kernel, precision=HIGHEST)


# ----------------------------------------------------------------------------
# Input preparation.
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _tf1_bilinear_matrix(n_in, n_out):
  """(n_out, n_in) weights of TF1's `resize_bilinear` (align_corners=False,
  half_pixel_centers=False): output i samples input i * n_in / n_out."""
  src = np.arange(n_out) * (n_in / n_out)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  m = np.zeros((n_out, n_in))
  np.add.at(m, (np.arange(n_out), lo), 1. - frac)
  np.add.at(m, (np.arange(n_out), hi), frac)
  return m.astype(np.float32)


def preprocess(images):
  """uint8 (or [0, 255] float) NHWC images -> (N, 299, 299, 3) network input.

  The resize is two small matmuls, exact to float32 rounding, so the same
  function serves any input size on any backend.
  """
  x = jnp.asarray(images, jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  h, w = x.shape[1:3]
  if (h, w) != (SIZE, SIZE):
    x = jnp.einsum('oh,nhwc->nowc', _tf1_bilinear_matrix(h, SIZE), x,
                   precision=HIGHEST)
    x = jnp.einsum('pw,nowc->nopc', _tf1_bilinear_matrix(w, SIZE), x,
                   precision=HIGHEST)
  return (x - 128.) / 128.


def features_fn(params):
  """`images -> (features, logits)`, to be called inside jit."""
  model = InceptionV3()
  return lambda images: model.apply({'params': params}, preprocess(images))


# ----------------------------------------------------------------------------
# Weights.
# ----------------------------------------------------------------------------


def param_shapes():
  """{'Mixed_5b/branch1x1/conv/kernel': shape, ...} of the network."""
  abstract = jax.eval_shape(InceptionV3().init, jax.random.key(0),
                            jnp.zeros((1, SIZE, SIZE, 3)))['params']
  return weights.shapes(abstract)


FORMAT = weights.Format(
    what='Inception weights',
    how_to_get=(
        'Download pytorch-fid\'s pt_inception-2015-12-05-6726825d.pth '
        '(release "fid_weights" of github.com/mseitzer/pytorch-fid) on a '
        'machine with internet, convert it once with `python -m '
        'multistep_cm.tools.convert_inception '
        '--pth=pt_inception-2015-12-05-6726825d.pth --out=inception_fid.npz` '
        '(needs `pip install torch`), and set '
        'config.evaluate.inception_weights (or $MULTISTEP_CM_INCEPTION) to '
        'the .npz.'),
    converter='convert_inception', param_shapes=param_shapes,
    # config.evaluate.inception_weights, when empty, falls back to it.
    env='MULTISTEP_CM_INCEPTION',
    where='is not the FID Inception\'s weights')


def load_params(path='', sha256=''):
  """The network's parameters from a converted `.npz` (local or gs://),
  its SHA-256 checked when one is given. Never downloads anything."""
  return FORMAT.load(path, sha256).params


def load_weights(path='', sha256=''):
  """(parameters, SHA-256 of the file): `load_params` with the digest it
  computed, for the record, without reading the file again."""
  loaded = FORMAT.load(path, sha256)
  return loaded.params, loaded.sha256
