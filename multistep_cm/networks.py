"""The network table: what a config's `model.name` builds.

A row turns the config's `model` fields (with `out_channels` set to the
data's channels), the dataset's `Condition` and the logSNR schedule into a
Flax Linen module `(z_t, t, cond, train) -> v`. A new network is one row.
"""

from multistep_cm import adm
from multistep_cm import conditioning
from multistep_cm import models


def _uvit(fields, condition, logsnr_fn):
  del logsnr_fn  # The UViT sees t itself.
  fields['levels'] = tuple(models.Level(*lv) for lv in fields['levels'])
  return models.UViT(models.UViTConfig(condition=condition, **fields))


def _mlp(fields, condition, logsnr_fn):
  del logsnr_fn
  return models.MLP(models.MLPConfig(condition=condition, **fields))


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


TABLE = {'uvit': _uvit, 'mlp': _mlp, 'adm': _adm}


def create_model(model_config, condition=conditioning.UNCONDITIONAL,
                 logsnr_fn=None):
  """The Linen module named by a config's `model` section (its fields and
  `out_channels`), conditioned on `condition`; `logsnr_fn` (t -> logSNR) for
  networks that see the noise level rather than t."""
  fields = dict(model_config)
  name = fields.pop('name')
  if name not in TABLE:
    raise ValueError(f'Unknown model {name!r}: expected one of '
                     f'{", ".join(TABLE)}.')
  return TABLE[name](fields, condition, logsnr_fn)
