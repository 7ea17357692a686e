"""Golden outputs of pytorch-fid's own FID Inception, for the parity test.

`random_state_dict` builds seeded random weights under pytorch-fid's key names
and shapes (stored in data/pt_inception_shapes.json); running this file feeds
them to pytorch-fid's `InceptionV3` (FID blocks, no resize, no normalisation)
and stores its pool_3 features and bias-free logits on fixed inputs in
data/inception_golden.npz. Regenerating needs pytorch-fid and torchvision (for
its model classes only); the test needs neither.

  python tests/inception_golden.py
"""

import json
import os

import numpy as np

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
SHAPES = os.path.join(DATA, 'pt_inception_shapes.json')
GOLDEN = os.path.join(DATA, 'inception_golden.npz')


def random_state_dict(seed=0):
  """Seeded weights scaled so activations neither vanish nor blow up over the
  network's depth (He-scaled kernels, batch norm near identity)."""
  with open(SHAPES) as f:
    shapes = json.load(f)
  rng = np.random.default_rng(seed)
  out = {}
  for key in sorted(shapes):
    shape = tuple(shapes[key])
    if key.endswith('num_batches_tracked'):
      out[key] = np.zeros(shape, np.int64)
    elif key.endswith('conv.weight'):
      out[key] = rng.standard_normal(shape) * np.sqrt(2. / np.prod(shape[1:]))
    elif key.endswith(('bn.weight', 'bn.running_var')):
      out[key] = rng.uniform(0.8, 1.2, shape)
    elif key.endswith(('bn.bias', 'bn.running_mean', 'fc.bias')):
      out[key] = rng.normal(0., 0.1, shape)
    elif key == 'fc.weight':
      out[key] = rng.standard_normal(shape) / np.sqrt(shape[1])
    else:
      raise KeyError(key)
    if out[key].dtype == np.float64:
      out[key] = out[key].astype(np.float32)
  return out


def inputs():
  """Three 299x299 network inputs in [-1, 1]: noise, a smooth gradient and a
  constant image (which exercises the padding-aware pools most)."""
  rng = np.random.default_rng(1)
  noise = rng.uniform(-1., 1., (299, 299, 3))
  yy, xx = np.meshgrid(np.linspace(-1, 1, 299), np.linspace(-1, 1, 299),
                       indexing='ij')
  smooth = np.stack([xx, yy, xx * yy], -1)
  const = np.full((299, 299, 3), 0.3)
  return np.stack([noise, smooth, const]).astype(np.float32)


def main():
  import sys  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  # torchvision's operator registrations fail on a CPU-only torch; the model
  # classes do not need them.
  sys.modules.setdefault('torchvision._meta_registrations',
                         types.ModuleType('torchvision._meta_registrations'))
  import torch  # pylint: disable=g-import-not-at-top
  from pytorch_fid import inception as pf  # pylint: disable=g-import-not-at-top

  if not os.path.exists(SHAPES):
    # The FID blocks replace torchvision's with same-shaped ones; loading the
    # weights into the FID model below (strictly) confirms it.
    model = pf._inception_v3(num_classes=1008, aux_logits=False, weights=None)  # pylint: disable=protected-access
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    with open(SHAPES, 'w') as f:
      json.dump(shapes, f, indent=0)
  sd = {k: torch.from_numpy(v) for k, v in random_state_dict().items()}
  pf.load_state_dict_from_url = lambda *a, **k: sd
  net = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]],
                       resize_input=False, normalize_input=False,
                       use_fid_inception=True).eval()
  x = torch.from_numpy(inputs()).permute(0, 3, 1, 2)
  with torch.no_grad():
    features = net(x)[0][:, :, 0, 0].double()
  logits = features @ sd['fc.weight'].double().T
  np.savez(GOLDEN, features=features.numpy().astype(np.float32),
           logits=logits.numpy().astype(np.float32))
  print(f'wrote {GOLDEN}; feature mean {features.mean():.4g}, '
        f'std {features.std():.4g}; logit std {logits.std():.4g}')


if __name__ == '__main__':
  main()
