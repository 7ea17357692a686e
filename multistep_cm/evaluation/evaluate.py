"""Evaluation mode: N samples of a checkpoint, scored, with the protocol on
record.

  python -m multistep_cm.main --config=... --workdir=RUN --mode=evaluate

Samples are generated in chunks under RUN/eval/<protocol>/; a chunk is
written whole (atomically) or not at all, so a preempted run continues from
the last finished chunk and recomputes nothing before it. The noise of sample
i depends only on (seed, i): not on the batch size, the mesh, the number of
hosts or where a run was interrupted.

Outputs, next to the chunks: `samples.npz` in the ADM layout (`arr_0` uint8
NHWC, `arr_1` labels) for the reference evaluator, `grid.png`, and
`protocol.json` with the sampler, steps, NFE, guidance, EMA, seed, reference,
N, the metric values and why any metric has none. Metrics: those of the
scorer the dataset names (`scoring.py`); the FID Inception's features are
computed on the devices right after sampling.
"""

import io
import json
import os
import time
import zipfile

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np

from multistep_cm import errors
from multistep_cm import run as run_lib
from multistep_cm import samplers
from multistep_cm.core import generation
from multistep_cm.core import images
from multistep_cm.core import progress
from multistep_cm.core import stages
from multistep_cm.core import state
from multistep_cm.evaluation import scoring


def protocol(run, step):
  """What is evaluated: the stage's sampler with config.evaluate's overrides
  (`stages.Stage.sampler`), and the rest of the protocol."""
  config, stage, dataset = run.config, run.stage, run.dataset
  ev = config.evaluate
  spec = stages.evaluation_sampler(config)
  return {
      'stage': config.stage, 'checkpoint_step': step, 'dataset':
          config.dataset.name, 'sampler': spec.kind, 'steps': spec.steps,
      'nfe': spec.nfe(dataset.condition),
      # Sampled with (a teacher), or distilled with (never guided again).
      'guidance': stage.guidance(config, spec),
      'sampling_guidance': spec.guidance,
      'ema': ev.ema, 'seed': ev.seed,
      'num_samples': ev.num_samples, 'chunk_size': ev.chunk_size,
      'labels': dataset.label_description,
      'uint8': 'clip to [-1, 1], round((x + 1) * 127.5)',
      # Converted weights sampled instead of the workdir's checkpoint.
      **({'imported_weights': config.imported_weights}
         if config.get('imported_weights') else {}),
      # An any-S student: the S it learned (`steps` may be another).
      **({'trained_steps': list(run.any_steps)} if run.any_steps else {}),
  }


def protocol_name(p):
  # Chunks without DINOv2 features cannot serve FD-DINOv2: its own directory.
  return (f'step{p["checkpoint_step"]}_{p["sampler"]}{p["steps"]}'
          f'_w{p["guidance"]:g}_{"ema" if p["ema"] else "online"}'
          f'_n{p["num_samples"]}_seed{p["seed"]}'
          f'{"_dinov2" if "dinov2" in p else ""}')


def _chunk_path(directory, c):
  return directory / f'chunk_{c:05d}.npz'


def _tmp(path):
  return path.parent / (path.name + '.tmp')


def _save_atomic(path, **arrays):
  """Written under a temporary name, then renamed: a chunk file exists
  only complete."""
  with _tmp(path).open('wb') as f:
    np.savez(f, **arrays)
  _tmp(path).replace(path)


def _load(path, keys=None):
  """The arrays `keys` (default: all) of a chunk .npz (local or gs://)."""
  with np.load(io.BytesIO(path.read_bytes())) as f:
    return {k: f[k] for k in (f.files if keys is None else keys)}


def _npy_member(zf, name, shape, dtype):
  """An open `name`.npy member of a zip file, its header written: the rows
  are appended by the caller."""
  out = zf.open(name + '.npy', 'w', force_zip64=True)
  np.lib.format.write_array_header_1_0(out, {
      'descr': np.lib.format.dtype_to_descr(np.dtype(dtype)),
      'fortran_order': False, 'shape': shape})
  return out


def write_adm_npz(path, chunk_paths, n):
  """Streams the `n` samples of the chunks into one ADM-layout .npz (`arr_0`
  samples, `arr_1` labels), reading each chunk once and never holding all
  samples in memory."""
  first = _load(chunk_paths[0])
  labels = []
  with _tmp(path).open('wb') as raw, zipfile.ZipFile(
      raw, 'w', zipfile.ZIP_STORED, allowZip64=True) as zf:
    with _npy_member(zf, 'arr_0', (n,) + first['samples'].shape[1:],
                     first['samples'].dtype) as out:
      for i, cp in enumerate(chunk_paths):
        chunk = first if i == 0 else _load(cp)
        out.write(np.ascontiguousarray(chunk['samples']).tobytes())
        labels.append(chunk['labels'])
    with _npy_member(zf, 'arr_1', (n,), np.int32) as out:
      out.write(np.concatenate(labels).astype(np.int32).tobytes())
  _tmp(path).replace(path)


def run(config, workdir):
  """Evaluates the newest checkpoint of `workdir`; returns the protocol
  record (also written as protocol.json). `config`: or its `run.Run`."""
  resolved = run_lib.of(config)
  config = resolved.config
  ev = config.evaluate
  if ev.num_samples < 1 or ev.chunk_size < 1:
    raise errors.ConfigError('config.evaluate.num_samples and chunk_size must '
                             'be positive.')
  if ev.reference and not scoring.scorer_class(resolved).reads_reference:
    raise errors.ConfigError(
        f'config.evaluate.reference is {ev.reference!r}, but the '
        f'{config.dataset.name} dataset is scored against no reference file: '
        'leave it unset.')
  # Everything that can be missing (weights, reference, checkpoint) is
  # checked before any sampling.
  scorer = scoring.get(resolved)
  params, param_sh, step = state.load_for_sampling(resolved, workdir, ev.ema)
  p = {**protocol(resolved, step), **scorer.record()}
  directory = epath.Path(workdir) / 'eval' / protocol_name(p)
  _check_spec(directory, p)

  spec = samplers.SamplerSpec(p['sampler'], p['steps'], p['sampling_guidance'])
  generator = generation.Generator(resolved, param_sh, spec,
                                   per_example_noise=True, uint8=True,
                                   features=scorer.features)
  labels, cond = generation.eval_inputs(resolved.dataset,
                                                ev.num_samples)
  n_chunks = -(-ev.num_samples // ev.chunk_size)
  paths = [_chunk_path(directory, c) for c in range(n_chunks)]
  # Process 0's view of the finished chunks decides, so all hosts run the
  # same sharded computations.
  done = multihost_utils.broadcast_one_to_all(
      np.array([q.exists() for q in paths]))
  todo = [c for c in range(n_chunks) if not done[c]]
  if len(todo) < n_chunks:
    logging.info('Resuming %s: %d of %d chunks already done.', directory,
                 n_chunks - len(todo), n_chunks)
  t0, made = time.time(), 0
  for c in todo:
    lo, hi = c * ev.chunk_size, min((c + 1) * ev.chunk_size, ev.num_samples)
    out = generator(params, jax.tree.map(lambda a, lo=lo, hi=hi: a[lo:hi],
                                         cond),
                    ev.seed, ev.batch_size, start=lo,
                    feature_params=scorer.feature_params)
    if jax.process_index() == 0:
      _save_atomic(paths[c], labels=labels[lo:hi], **out)
    made += hi - lo
    rate = made / (time.time() - t0)
    left = sum(min(ev.chunk_size, ev.num_samples - k * ev.chunk_size)
               for k in todo[todo.index(c) + 1:])
    logging.info('Chunk %d/%d: %d samples, %.2f samples/s, ETA %s', c + 1,
                 n_chunks, hi, rate, progress.format_eta(left / rate))
  multihost_utils.sync_global_devices('evaluation chunks written')
  if jax.process_index() != 0:
    return p
  keys = scorer.inputs + ('labels',)
  chunks = [_load(q, keys) for q in paths]  # Each chunk read once.
  gathered = {k: np.concatenate([c[k] for c in chunks]) for k in keys}
  p['metrics'] = scorer.score(gathered, gathered['labels'])
  unreported = scorer.unreported(ev.num_samples)
  if unreported:
    p['not_reported'] = unreported
  p['seconds_sampling_this_run'] = round(time.time() - t0, 1)
  p['samples_npz'] = os.fspath(directory / 'samples.npz')
  write_adm_npz(directory / 'samples.npz', paths, ev.num_samples)
  first = _load(paths[0])
  n = min(config.train_eval.grid_size, len(first['labels']))
  grid = first['samples'][:n]
  if grid.dtype == np.uint8:
    grid = grid.astype(np.float32) / 127.5 - 1.
  images.save_samples_png(directory / 'grid.png', grid, first['labels'][:n],
                          resolved.dataset.grid_columns,
                          title=protocol_name(p))
  (directory / 'protocol.json').write_text(json.dumps(p, indent=2))
  names = {m.key: m.label for m in scorer.metrics}
  logging.info('Evaluation %s: %s. Wrote %s/{samples.npz,grid.png,'
               'protocol.json}.', protocol_name(p), ', '.join(
                   [f'{k} {v:.4g}' for k, v in p['metrics'].items()] +
                   [f'no {names.get(k, k)} ({why})'
                    for k, why in unreported.items()]), directory)
  return p


def _check_spec(directory, p):
  """Chunks of another protocol (or Inception) must never be mixed in; the
  reference may change, as the chunks do not depend on it."""
  path = directory / 'spec.json'
  spec = {k: v for k, v in p.items() if k != 'reference'}
  if path.exists():
    if json.loads(path.read_text()) != json.loads(json.dumps(spec)):
      raise errors.ConfigError(
          f'{directory} holds chunks of a different protocol ({path}); '
          'move it away to start over.')
  elif jax.process_index() == 0:
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, indent=2))
  if jax.process_index() == 0:
    for stale in directory.glob('*.tmp'):
      stale.unlink()  # A write cut short by a crash.
