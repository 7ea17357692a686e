"""The quick evaluation: a few samples of a stage's sampler, scored by the
dataset's built-in scorer. Training runs score their EMA weights with it
every eval_every steps; --mode=sample writes its samples; the pipeline's
table and the sweep score checkpoints with it.

Noise is drawn per batch of `config.train_eval.batch_size`, from
config.seed plus an offset per use, so the uses draw independent samples.
"""

from absl import logging
from etils import epath
import jax

from multistep_cm import run as run_lib
from multistep_cm.core import generation
from multistep_cm.core import images
from multistep_cm.core import stages
from multistep_cm.core import state
from multistep_cm.evaluation import scoring

SEED_TRAINING, SEED_SAMPLE_MODE, SEED_TABLES = 1, 2, 3


def table_seed(i):
  """The seed offset of a table's i-th noise seed (its spread): the first
  is SEED_TABLES, the others clear of every use above."""
  return SEED_TABLES if i == 0 else SEED_TABLES + 10 * i


class QuickEval:
  """`(params) -> (samples, scores)`: `num_samples` (default
  config.train_eval.num_samples) samples of `spec` (default the stage's own
  sampler), drawn for the dataset's evaluation labels."""

  def __init__(self, run, param_shardings, seed_offset, spec=None,
               num_samples=None):
    config = run.config
    self.spec = spec or run.stage.sampler(config)
    self.generator = generation.Generator(run, param_shardings, self.spec)
    self.labels, self.cond = generation.eval_inputs(
        run.dataset, num_samples or config.train_eval.num_samples)
    self.seed = config.seed + seed_offset
    self.batch_size = config.train_eval.batch_size
    self.scorer = scoring.get(run, quick=True)

  def __call__(self, params):
    samples = self.generator(params, self.cond, self.seed,
                             self.batch_size)['samples']
    return samples, self.scorer.score({'samples': samples}, self.labels)


def from_checkpoint(run, workdir, seed_offset, spec=None, num_samples=None,
                    use_ema=True):
  """The quick evaluation of the newest checkpoint in `workdir`: (quick
  evaluation, its samples, their scores, the checkpoint's step)."""
  params, shardings, step = state.load_for_sampling(run, workdir, use_ema)
  quick = QuickEval(run, shardings, seed_offset, spec, num_samples)
  samples, scores = quick(params)
  return quick, samples, scores, step


def write_samples(config, workdir, num_samples):
  """--mode=sample: `num_samples` samples of the newest checkpoint, drawn
  with the stage's sampler and config.evaluate's overrides, as a PNG grid
  and an ADM-layout .npz (uint8 NHWC `arr_0`, labels `arr_1`). Returns
  their paths. `config`: or its `run.Run`."""
  run = run_lib.of(config)
  config = run.config
  quick, samples, scores, step = from_checkpoint(
      run, workdir, SEED_SAMPLE_MODE, stages.evaluation_sampler(config),
      num_samples=num_samples)
  base = epath.Path(workdir) / (f'samples_step{step}_{quick.spec.name}'
                                f'_n{num_samples}')
  png, npz = base.with_suffix('.png'), base.with_suffix('.npz')
  if jax.process_index() == 0:
    n = config.train_eval.grid_size
    images.save_samples_png(png, samples[:n], quick.labels[:n],
                            run.dataset.grid_columns)
    images.save_npz(npz, samples, quick.labels)
  logging.info('Wrote %s and .npz (%d samples, %s)%s', png, num_samples,
               quick.spec.name, '; ' + ', '.join(
                   f'{k} {v:.4g}' for k, v in scores.items()) if scores else '')
  return png, npz
