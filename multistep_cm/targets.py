"""Accelerators that are not here: a TPU slice or a GPU node, compiled for
from any machine.

  python -m multistep_cm.targets install   # once: the TPU and GPU compilers
  python -m multistep_cm.targets           # the targets and their figures

A target is named as its users book it: a TPU slice by its accelerator type
(v4-32, v5litepod-64, v5p-64, v6e-64; `2xv5p-64` is two slices of it) and a
GPU node by its count of GPUs (8xh100, 8xh200, 8xb200, 8xa100; 16xh100 is
two nodes). `devices(target)` gives compile-only devices of it: a mesh over
them, `jit(...).lower(abstract inputs).compile()` and the compiled
program's memory and cost analyses work with no accelerator present.

The compilers (libtpu; jax's CUDA plugin with ptxas, without the CUDA
runtime's libraries) are installed into a folder of their own, not beside
jax: jax loads every TPU library and CUDA plugin it can import at start-up,
so beside it they would be loaded, and fail with a screenful of errors, in
every program on a machine without the chips. From that folder they are
loaded only when a target is asked for, after the host's own backend is up.

`platform()` is the platform that backend-dependent choices (the attention
kernel) follow: the target's while `compiling_for(target)` is open, else
the host's.
"""

import contextlib
import contextvars
import dataclasses
import importlib
import math
import os
import re
import subprocess
import sys

import jax

from multistep_cm import errors

GIB = 2 ** 30
ENV_DIR = 'MULTISTEP_CM_COMPILERS'
INSTALL = 'python -m multistep_cm.targets install'
# The compilers that match the jax setup.py pins (jax[tpu]==0.10.2 pins that
# libtpu), each installed without its dependencies: the CUDA plugin's would
# bring cuBLAS, cuDNN and NCCL (several GB), which compiling does not use;
# ptxas and nvlink come with nvidia-cuda-nvcc.
COMPILERS = ('libtpu==0.0.42.1',
             f'jax-cuda13-plugin=={jax.__version__}',
             f'jax-cuda13-pjrt=={jax.__version__}',
             'nvidia-cuda-nvcc==13.5.37', 'nvidia-nvvm==13.5.37',
             'nvidia-cuda-crt==13.5.37', 'nvidia-cuda-runtime==13.5.37')


class TargetError(errors.UserError):
  """An unknown target, or its compiler not installed."""


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator, as its vendor specifies it: memory per device (a v4
  chip without megacore would be two devices; none here is), dense bf16
  peak and memory bandwidth."""
  name: str
  platform: str  # 'tpu' or 'gpu', as jax names backends.
  memory_bytes: float
  peak_flops: float  # Dense bf16, per device.
  bandwidth: float  # Bytes per second, per device.
  # What a program may use of it, where less than `memory_bytes`.
  usable_bytes: float = 0.
  # TPU: jax's name of the generation, and how many of the accelerator
  # type's count make a chip (v4 and v5p count TensorCores, two per chip).
  jax_name: str = ''
  per_chip: int = 1
  dims: int = 3  # The torus of a slice: 3-D (v4, v5p) or 2-D (v5e, v6e).
  # GPU: what XLA's compiler is told of the device (GpuTargetConfigProto).
  description: str = ''
  sms: int = 0
  compute_capability: tuple = ()
  shared_per_sm: int = 0
  fpus_per_sm: int = 0
  l2_bytes: int = 0
  clock_ghz: float = 0.


# Sources. TPUs: cloud.google.com/tpu/docs/v4, /v5p, /v5e, /v6e (the system
# architecture pages: HBM per chip, peak bf16 compute, HBM bandwidth); what
# a program may use is libtpu's own figure, which it names when it refuses
# a program ("exceeds available HBM (15.75G)", G meaning GiB: a 40 GiB
# program reads 40.00G).
# GPUs: vendor memory in GB (10^9 bytes), which the driver's figure slightly
# exceeds: a fit verdict errs on the safe side.
# nvidia.com's datasheets of the H100 SXM, H200 SXM, HGX B200 and
# A100 80GB SXM (GPU memory, memory bandwidth, dense BF16 tensor core =
# half the "with sparsity" figure); SMs, compute capability, shared memory
# and L2 from the CUDA programming guide and the architecture whitepapers.
CHIPS = {
    'v4': Chip('TPU v4', 'tpu', 32 * GIB, 275e12, 1200e9,
               usable_bytes=30.75 * GIB, jax_name='v4', per_chip=2),
    'v5p': Chip('TPU v5p', 'tpu', 95 * GIB, 459e12, 2765e9,
                usable_bytes=95.74 * GIB, jax_name='v5p', per_chip=2),
    'v5litepod': Chip('TPU v5e', 'tpu', 16 * GIB, 197e12, 819e9,
                      usable_bytes=15.75 * GIB, jax_name='v5e', dims=2),
    'v6e': Chip('TPU v6e', 'tpu', 32 * GIB, 918e12, 1640e9,
                usable_bytes=31.25 * GIB, jax_name='v6e', dims=2),
    'h100': Chip('H100 SXM', 'gpu', 80e9, 989e12, 3.35e12,
                 description='NVIDIA H100 80GB HBM3', sms=132,
                 compute_capability=(9, 0), shared_per_sm=233472,
                 fpus_per_sm=128, l2_bytes=50 * 2**20, clock_ghz=1.98),
    'h200': Chip('H200 SXM', 'gpu', 141e9, 989e12, 4.8e12,
                 description='NVIDIA H200', sms=132,
                 compute_capability=(9, 0), shared_per_sm=233472,
                 fpus_per_sm=128, l2_bytes=50 * 2**20, clock_ghz=1.98),
    'b200': Chip('B200', 'gpu', 180e9, 2250e12, 8e12,
                 description='NVIDIA B200', sms=148,
                 compute_capability=(10, 0), shared_per_sm=233472,
                 fpus_per_sm=128, l2_bytes=126 * 2**20, clock_ghz=1.965),
    'a100': Chip('A100 80GB SXM', 'gpu', 80e9, 312e12, 2.039e12,
                 description='NVIDIA A100-SXM4-80GB', sms=108,
                 compute_capability=(8, 0), shared_per_sm=167936,
                 fpus_per_sm=64, l2_bytes=40 * 2**20, clock_ghz=1.41),
}
# The chip of a jax device, by a substring of its `device_kind`, the more
# specific first.
DEVICE_KINDS = (('H100', 'h100'), ('H200', 'h200'), ('B200', 'b200'),
                ('A100', 'a100'), ('TPU v5 lite', 'v5litepod'),
                ('TPU v5e', 'v5litepod'), ('TPU v6', 'v6e'),
                ('TPU v5', 'v5p'), ('TPU v4', 'v4'))
GPUS_PER_NODE = 8
# jax preallocates this share of a GPU's memory unless
# XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise (the launchers keep it).
GPU_MEM_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class Target:
  """A slice or a node: `devices` of `chip`, in `slices` slices (TPU) or
  `hosts` hosts (GPU)."""
  name: str
  chip: Chip
  devices: int
  topology: str  # jax's topology name: 'v5p:2x4x4', '1x1x8'.
  slices: int = 1

  @property
  def platform(self):
    return self.chip.platform

  @property
  def usable_bytes(self):
    """What a program may use per device: on a TPU, what libtpu leaves it;
    on a GPU, the share jax preallocates."""
    if self.platform != 'gpu':
      return self.chip.usable_bytes or self.chip.memory_bytes
    return self.chip.memory_bytes * gpu_mem_fraction()

  def describe(self):
    usable = f', {self.usable_bytes / GIB:.2f} GiB usable'
    if self.platform == 'gpu':
      usable = (f', of which jax takes {gpu_mem_fraction():.0%} '
                '(XLA_PYTHON_CLIENT_MEM_FRACTION)')
    slices = f' in {self.slices} slices' if self.slices > 1 else ''
    return (f'{self.name}: {self.devices} {self.chip.name} devices{slices} '
            f'(topology {self.topology}), {self.chip.memory_bytes / GIB:.1f} '
            f'GiB each{usable}, {self.chip.peak_flops / 1e12:g} TFLOP/s '
            f'bf16, {self.chip.bandwidth / 1e9:g} GB/s')


def chip_of(device_kind):
  """The Chip of a jax device's `device_kind`, or None (the CPU)."""
  return next((CHIPS[key] for kind, key in DEVICE_KINDS
               if kind in device_kind), None)


def gpu_mem_fraction():
  try:
    return float(os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION',
                                GPU_MEM_FRACTION))
  except ValueError:
    return GPU_MEM_FRACTION


def _torus(chips, dims):
  """The slice's shape in chips, as Cloud TPU builds it: 2x2x1, 2x2x2,
  2x2x4, 2x4x4, 4x4x4, ... (3-D); 1x1, 2x2, 2x4, 4x4, 4x8, ... (2-D)."""
  shape = [1] * dims
  if dims == 3 and chips >= 4:
    shape = [2, 2, 1]
  while math.prod(shape) < chips:
    # The smallest side grows, the last of equals first: 2x2x2 -> 2x2x4.
    smallest = min(shape)
    shape[max(i for i, s in enumerate(shape) if s == smallest)] *= 2
  return 'x'.join(map(str, shape))


def names():
  """Examples of every kind of target, for messages and the table."""
  return ('v4-32', 'v5litepod-64', 'v5p-64', 'v6e-64', '2xv5p-64', '8xh100',
          '8xh200', '8xb200', '8xa100', '16xh100')


def get(name):
  """The Target of a name, or a one-line TargetError."""
  text = name.strip().lower()
  match = re.fullmatch(r'(?:(\d+)x)?(v4|v5p|v5litepod|v6e)-(\d+)', text)
  if match:
    slices, kind, count = int(match[1] or 1), match[2], int(match[3])
    chip = CHIPS[kind]
    chips = count // chip.per_chip
    smallest = 1 if chip.dims == 2 else 4
    if (count % chip.per_chip or chips < smallest or chips & (chips - 1)
        or chips == 2 or slices < 1):
      raise TargetError(
          f'{name}: not a {kind} slice: its size is a power of two, from '
          f'{kind}-{smallest * chip.per_chip}.')
    return Target(name, chip, chips * slices,
                  f'{chip.jax_name}:{_torus(chips, chip.dims)}', slices)
  match = re.fullmatch(r'(\d+)x(h100|h200|b200|a100)', text)
  if match:
    count, chip = int(match[1]), CHIPS[match[2]]
    if count < 1 or (count > GPUS_PER_NODE and count % GPUS_PER_NODE):
      raise TargetError(f'{name}: up to {GPUS_PER_NODE} GPUs in one node, or '
                        f'a multiple of {GPUS_PER_NODE} over several.')
    hosts = max(1, count // GPUS_PER_NODE)
    return Target(name, chip, count, f'1x{hosts}x{count // hosts}')
  raise TargetError(f'unknown target {name!r}: expected a TPU slice or a GPU '
                    f'node, e.g. {", ".join(names())}.')


_PLATFORM = contextvars.ContextVar('multistep_cm_target_platform',
                                   default=None)


def platform():
  """The platform backend-dependent choices follow: a target's while
  `compiling_for` it, else this process's default backend."""
  return _PLATFORM.get() or jax.default_backend()


@contextlib.contextmanager
def compiling_for(target):
  """Within: `platform()` is the target's (None: the host's)."""
  token = _PLATFORM.set(target.platform if target else None)
  try:
    yield
  finally:
    _PLATFORM.reset(token)


def compilers_dir():
  return os.environ.get(ENV_DIR) or os.path.join(
      os.path.expanduser('~'), '.cache', 'multistep_cm',
      f'compilers-jax-{jax.__version__}')


def _installed(path):
  if not os.path.exists(path):
    raise TargetError(
        f'compiling for a target needs the TPU and GPU compilers, which are '
        f'not in {compilers_dir()}: run `{INSTALL}` (about 400 MB to '
        f'download, 1.4 GB on disk; ${ENV_DIR} chooses the folder).')
  return path


@contextlib.contextmanager
def _environ(**values):
  """`os.environ` with `values` set where unset, as it was afterwards."""
  saved = {k: os.environ.get(k) for k in values}
  for key, value in values.items():
    os.environ.setdefault(key, value)
  try:
    yield
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)


def _tpu_devices(target):
  library = os.path.join(compilers_dir(), 'libtpu', 'libtpu.so')
  _installed(library)
  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies
  # Off a TPU VM libtpu cannot read the slice from the machine, and says so
  # in two lines unless told; the topology name is what it compiles for.
  # Its warnings (an involuntary rematerialization among them) reach stderr
  # only from level 1, read when it loads. Its lock file, which keeps a
  # second process off the chips, would keep two compiling processes apart.
  with _environ(TPU_LIBRARY_PATH=library, TPU_WORKER_HOSTNAMES='localhost',
                TPU_ACCELERATOR_TYPE=f'{target.chip.jax_name}-8',
                TPU_STDERR_LOG_LEVEL='1', TPU_MIN_LOG_LEVEL='1',
                ALLOW_MULTIPLE_LIBTPU_LOAD='1'):
    options = {'num_slices': target.slices}
    if target.chip.per_chip == 2:
      options['chip_config_name'] = 'megacore'  # One device per chip.
    return topologies.get_topology_desc(
        topology_name=target.topology, platform='tpu', **options).devices


def gpu_target_config(chip):
  """The GpuTargetConfigProto (text) that XLA compiles for `chip` with."""
  major, minor = chip.compute_capability
  return f'''gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {chip.shared_per_sm}
  shared_memory_per_block_optin: {chip.shared_per_sm - 1024}
  threads_per_core_limit: 2048
  core_count: {chip.sms}
  fpus_per_core: {chip.fpus_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(chip.bandwidth)}
  l2_cache_size: {chip.l2_bytes}
  clock_rate_ghz: {chip.clock_ghz}
  device_memory_size: {int(chip.memory_bytes)}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 12 }}
runtime_version {{ major: 13 minor: 0 }}
device_description_str: "{chip.description}"
'''


def _load_cuda_plugin():
  """Registers the CUDA plugin from the compilers' folder (where jax has
  none of its own): as a compiler only, the host's backend is already up."""
  folder = _installed(os.path.join(compilers_dir(), 'jax_plugins'))
  if os.path.dirname(folder) not in sys.path:
    sys.path.append(os.path.dirname(folder))
  plugin = importlib.import_module('jax_plugins.xla_cuda13')
  # Its start-up check looks for the CUDA libraries a GPU run needs.
  with _environ(JAX_SKIP_CUDA_CONSTRAINTS_CHECK='1'):
    plugin.initialize()


def _gpu_devices(target):
  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies

  def topology():
    return topologies.get_topology_desc(
        platform='cuda', topology=target.topology,
        target_config=gpu_target_config(target.chip))
  try:
    return topology().devices
  except NotImplementedError:  # No CUDA plugin yet in this process.
    _load_cuda_plugin()
    return topology().devices


def devices(target):
  """Compile-only devices of `target`, in jax's order for a mesh."""
  jax.devices()  # The host's backend first: a compiler never becomes it.
  if target.platform == 'tpu':
    return list(_tpu_devices(target))
  return list(_gpu_devices(target))


def install(folder=None):
  """pip-installs the compilers into `folder` (default `compilers_dir()`)."""
  folder = folder or compilers_dir()
  command = [sys.executable, '-m', 'pip', 'install', '--quiet', '--no-deps',
             '--upgrade', '--target', folder, *COMPILERS]
  print('$', ' '.join(command), flush=True)
  subprocess.run(command, check=True)
  print(f'installed in {folder}', flush=True)


def main(argv):
  if argv[1:] == ['install']:
    install()
  elif argv[1:]:
    sys.exit(f'usage: {INSTALL}  (or no argument: the targets)')
  else:
    print(f'compilers: {compilers_dir()}')
    for name in names():
      print(get(name).describe())


if __name__ == '__main__':
  main(sys.argv)
