"""The device mesh, parameter sharding rules and global batch assembly.

The mesh is described in the config as named axes with sizes, -1 meaning "the
remaining devices", e.g. axes ('data', 'fsdp') with shape (-1, 1). The batch is
split over every axis; parameters are sharded over 'fsdp' (FSDP: each weight
split along its largest divisible dimension) and replicated over 'data'.
"""

import math

import jax
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# Weights smaller than this stay replicated: sharding them saves no memory
# worth the extra collective.
MIN_FSDP_SIZE = 2**14


def make_mesh(axes, shape, devices=None):
  """Builds the mesh from named axes and sizes (one size may be -1)."""
  devices = jax.devices() if devices is None else devices
  shape = list(shape)
  if len(axes) != len(shape):
    raise ValueError(f'mesh axes {axes} and shape {shape} differ in length.')
  if shape.count(-1) > 1:
    raise ValueError(f'mesh shape {shape} has more than one -1.')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f'{len(devices)} devices do not fill mesh shape {shape}:'
                       ' set --config.mesh.shape to sizes that divide them.')
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f'mesh shape {shape} needs {math.prod(shape)} devices, '
                     f'there are {len(devices)}.')
  # Auto axes: the compiler propagates shardings from the explicit in/out
  # shardings of each jitted function; the networks add constraints only
  # where propagation alone goes wrong (models.constrain_batch,
  # conditioning.Embed), under the mesh the jitted function puts in context.
  auto = (jax.sharding.AxisType.Auto,) * len(axes)
  slices = len({getattr(d, 'slice_index', 0) for d in devices})
  if slices > 1:
    return _multislice_mesh(axes, shape, devices, slices, auto)
  try:
    return jax.make_mesh(tuple(shape), tuple(axes), axis_types=auto,
                         devices=devices)
  except NotImplementedError:
    # A TPU torus whose sides no axis matches (16 over a v6e-64's 8x8):
    # jax.make_mesh splits a physical axis only on v5e; any TPU can.
    grid = mesh_utils.create_device_mesh(shape, devices,
                                         allow_split_physical_axes=True)
    return jax.sharding.Mesh(grid, tuple(axes), axis_types=auto)


def _multislice_mesh(axes, shape, devices, slices, axis_types):
  """The mesh over several TPU slices (joined by the data-center network,
  slower than the chips' own links): the first axis ('data') spans the
  slices and every other axis stays within one, so that only the
  gradients' reduction crosses between slices."""
  if shape[0] % slices:
    raise ValueError(f'mesh shape {shape}: its first axis, {axes[0]}, spans '
                     f'the {slices} slices, and {shape[0]} is not a multiple '
                     'of them.')
  grid = mesh_utils.create_hybrid_device_mesh(
      [shape[0] // slices] + shape[1:], [slices] + [1] * (len(shape) - 1),
      devices, allow_split_physical_axes=True)
  return jax.sharding.Mesh(grid, tuple(axes), axis_types=axis_types)


def batch_spec(mesh):
  """The batch dimension is split over all mesh axes."""
  return P(tuple(mesh.axis_names))


def batch_sharding(mesh):
  return NamedSharding(mesh, batch_spec(mesh))


def param_spec(shape, mesh, axis='fsdp'):
  """FSDP rule: shard the largest dimension divisible by the 'fsdp' size."""
  size = mesh.shape.get(axis, 1)
  if size == 1 or math.prod(shape) < MIN_FSDP_SIZE:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % size == 0:
      spec = [None] * len(shape)
      spec[dim] = axis
      return P(*spec)
  return P()


def tree_shardings(abstract_tree, mesh):
  """NamedShardings for a pytree of ShapeDtypeStructs (params, EMA, opt state)."""
  return jax.tree.map(
      lambda x: NamedSharding(mesh, param_spec(x.shape, mesh)), abstract_tree)


def process_rows(batch_size, mesh):
  """The rows (a slice) of a global batch of `batch_size` that this process's
  devices hold: the only rows its input pipeline reads."""
  index_map = batch_sharding(mesh).addressable_devices_indices_map(
      (batch_size,))
  starts = sorted({idx[0].indices(batch_size)[:2] for idx in index_map.values()})
  for (_, stop), (start, _) in zip(starts, starts[1:]):
    if stop != start:  # make_array_from_process_local_data needs one block.
      raise ValueError(f'this process holds rows {starts} of the batch, not '
                       'one contiguous block: order the mesh by process.')
  return slice(starts[0][0], starts[-1][1])


def global_batch(local_batch, mesh):
  """Assembles this process's numpy batch into one global jax.Array."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_batch)


def batch_from_full(x, mesh):
  """The global batch-sharded array of `x`, a numpy array every process holds
  in full (eval labels, images to score): each device takes its own rows."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, batch_sharding(mesh),
                                      lambda index: x[index])


def mesh_batch_size(batch_size, mesh):
  """`batch_size` rounded up to a multiple of the mesh's devices."""
  return batch_size + (-batch_size % mesh.size)


def padded_batches(x, batch_size, mesh):
  """Over `x`, a numpy array (or a pytree of them, e.g. captions) every
  process holds in full: (start, the batch-sharded x[start:start +
  batch_size] zero-padded to batch_size, its number of real rows)."""
  n = len(jax.tree.leaves(x)[0])

  def padded(a, i):
    chunk = np.asarray(a[i:i + batch_size])
    pad = ((0, batch_size - len(chunk)),) + ((0, 0),) * (chunk.ndim - 1)
    return batch_from_full(np.pad(chunk, pad), mesh)
  for i in range(0, n, batch_size):
    yield (i, jax.tree.map(lambda a, i=i: padded(a, i), x),
           min(batch_size, n - i))


def to_host(x, rows):
  """The first `rows` rows of a batch-sharded array, on every host."""
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))[:rows]
