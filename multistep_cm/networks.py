"""The network table: what a config's `model.name` builds, and everything
else that is particular to that network.

A row's builder turns the config's `model` fields (with `out_channels` set
to the data's channels), the dataset's `Condition` and the logSNR schedule
into a Flax Linen module `(z_t, t, cond, train) -> v`. The rest of the row
is what the framework asks of a network without naming it: its own config
checks, a second parameter layout it can load, whether it has a null
condition, how a smoke test shrinks it, and, for a network imported from
elsewhere, its converted weights. A new network is one row.
"""

import dataclasses
from typing import Any, Callable, Optional

from multistep_cm import adm
from multistep_cm import conditioning
from multistep_cm import models
from multistep_cm import targets


def _nothing(arg):
  del arg


def _always(module):
  del module
  return True


@dataclasses.dataclass(frozen=True)
class Network:
  """One row of the table."""
  # (fields, condition, logsnr_fn) -> the Linen module.
  build: Callable
  # (fields) -> None, or ValueError for fields this network cannot run with
  # on these devices (a config check, before anything is built).
  check: Callable = _nothing
  # (module) -> the module of the same weights in another parameter layout,
  # which `relayout(params, module)` turns into `module`'s: a checkpoint
  # saved in either layout loads into both. None: one layout only.
  other_layout: Optional[Callable] = None
  relayout: Optional[Callable] = None
  # (module) -> whether it has a null condition: guidance and label dropout
  # need one.
  has_null: Callable = _always
  # (config.model) -> None: shrinks it to run in seconds on a CPU.
  smoke: Callable = _nothing
  # A network imported from elsewhere: the `weights.Format` of its converted
  # weights, and the scope of the module that holds them ('' for the
  # module's own parameters); `core.state` checks them against the module
  # the config builds.
  weights: Any = None
  weights_scope: str = ''


def _uvit(fields, condition, logsnr_fn):
  del logsnr_fn  # The UViT sees t itself.
  fields['levels'] = tuple(models.Level(*lv) for lv in fields['levels'])
  return models.UViT(models.UViTConfig(condition=condition, **fields))


def _check_uvit(fields):
  attention = fields.get('attention', 'auto')
  if attention not in models.ATTENTION:
    raise ValueError(f'attention is {attention!r}: expected one of '
                     f'{", ".join(models.ATTENTION)}.')
  remat = fields.get('remat', 'none')
  if remat not in models.REMAT:
    raise ValueError(f'remat is {remat!r}: expected one of '
                     f'{", ".join(models.REMAT)}.')
  check_attention(attention)


# Where a forced kernel runs: cuDNN's on NVIDIA GPUs; splash on TPUs, and on
# the CPU in Pallas's interpret mode (slowly: to check its numerics).
KERNEL_PLATFORMS = {'cudnn': ('gpu',), 'splash': ('tpu', 'cpu')}
KERNEL_NEEDS = {'cudnn': 'an NVIDIA GPU', 'splash': 'a TPU'}


def check_attention(attention):
  platforms = KERNEL_PLATFORMS.get(attention)
  if platforms and targets.platform() not in platforms:
    raise ValueError(
        f"attention {attention!r} needs {KERNEL_NEEDS[attention]}; this "
        f"run's devices are {targets.platform()}: use 'auto' or 'xla'.")


def _uvit_other_layout(module):
  return module.clone(config=dataclasses.replace(
      module.config, scan=not module.config.scan))


def _smoke_uvit(model):
  model.levels = (('res', 16, 1, 0.), ('attn', 32, 1, 0.))
  model.mid_channels = 32
  model.mid_blocks = 1
  model.emb_dim = 32
  model.head_dim = min(model.head_dim, 32)


def _mlp(fields, condition, logsnr_fn):
  del logsnr_fn
  return models.MLP(models.MLPConfig(condition=condition, **fields))


def _smoke_mlp(model):
  model.width = 32
  model.num_blocks = 1
  model.emb_dim = 16


def _adm(fields, condition, logsnr_fn):
  """The ADM U-Net in Karras form: it sees sigma = exp(-logSNR / 2)."""
  if isinstance(condition, conditioning.ClassLabels):
    fields['num_classes'] = condition.num_classes
  elif condition.conditional:
    raise ValueError(f'The ADM network is conditioned on class labels or on '
                     f'nothing, not on {type(condition).__name__}.')
  else:
    fields['num_classes'] = 0
  fields['in_channels'] = fields['out_channels']
  wrapper = {k: fields.pop(k) for k in ('preconditioning', 'time_input')
             if k in fields}
  return adm.Network(adm.ADMConfig(**fields), condition, logsnr_fn,
                     **wrapper)


TABLE = {
    'uvit': Network(_uvit, check=_check_uvit,
                    other_layout=_uvit_other_layout,
                    relayout=lambda params, module: models.relayout(
                        params, module.config),
                    smoke=_smoke_uvit),
    'mlp': Network(_mlp, smoke=_smoke_mlp),
    'adm': Network(_adm, check=lambda fields: check_attention(
        fields.get('attention', 'auto')),
                   has_null=lambda module: module.has_null_condition,
                   weights=adm.FORMAT, weights_scope=adm.UNET),
}

DEFAULT = 'uvit'  # The base config's network.


def register(name, row):
  """Adds (or replaces) the row `name`, a `Network`."""
  TABLE[name] = row


def get(name):
  """The row of `name` (ValueError if the table has none)."""
  if name not in TABLE:
    raise ValueError(f'Unknown model {name!r}: expected one of '
                     f'{", ".join(TABLE)}.')
  return TABLE[name]


def create_model(model_config, condition=conditioning.UNCONDITIONAL,
                 logsnr_fn=None):
  """The Linen module named by a config's `model` section (its fields and
  `out_channels`), conditioned on `condition`; `logsnr_fn` (t -> logSNR) for
  networks that see the noise level rather than t."""
  fields = dict(model_config)
  row = get(fields.pop('name'))
  row.check(fields)
  return row.build(fields, condition, logsnr_fn)
