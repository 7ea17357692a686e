"""Sampling mode: loads the newest checkpoint of a workdir and writes N
samples as a PNG grid and an ADM-layout .npz (uint8 NHWC `arr_0`, `arr_1`)."""

import os

from absl import logging
import jax

from multistep_cm import images
from multistep_cm import models
from multistep_cm import train


def sample_checkpoint(config, workdir, num_samples, use_ema=True):
  """Returns the paths of the written PNG and .npz."""
  mesh = train.make_mesh(config)
  model, params, sh, step = train.restore_for_sampling(config, workdir, mesh,
                                                       use_ema)
  network = models.network_fn(model)
  sampler = train.make_sampler(config, network, sh, mesh)
  samples, labels = train.generate(config, sampler, params, mesh, num_samples,
                                   config.seed + 2)
  scores = train.sample_metrics(config, samples, labels)
  kind, steps = train.eval_sampler(config)
  base = os.path.join(workdir, f'samples_step{step}_{kind}{steps}'
                      f'_n{num_samples}')
  if jax.process_index() == 0:
    images.save_samples_png(base + '.png', samples[:config.eval.grid_size],
                            labels[:config.eval.grid_size],
                            config.dataset.num_classes)
    images.save_npz(base + '.npz', samples, labels)
  logging.info('Wrote %s.png and .npz (%d samples, %s %d steps)%s', base,
               num_samples, kind, steps,
               '; ' + ', '.join(f'{k} {v:.4g}' for k, v in scores.items())
               if scores else '')
  return base + '.png', base + '.npz'
