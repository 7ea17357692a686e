"""Every shipped config on the hardware users book, compiled from this machine.

  python -m multistep_cm.targets install          # once: the compilers
  python benchmarks/targets_table.py --results=benchmarks/targets.jsonl
  python benchmarks/targets_table.py --results=benchmarks/targets.jsonl --table

compiles each config's train step (its stage, its global batch, its mesh)
for each target with the target's own compiler (`--mode=describe --target`,
`multistep_cm.describe`), and with `--fit` searches the largest per-device
batch that fits. One JSON line per (config, target) is appended to
`--results` as soon as it is compiled, and a rerun skips the pairs already
there: a paper-size compile takes minutes on a laptop, and an interrupted
run resumes. `--table` prints the results as the markdown table of
docs/targets.md. Compiler figures, not measurements: memory is the
compiler's buffer assignment for the target, the step time a roofline lower
bound (model FLOPs at the chip's dense bf16 peak, or the bytes the program
must move at its memory bandwidth, whichever is longer).
"""

import argparse
import importlib.util
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
from multistep_cm import describe
from multistep_cm import errors
from multistep_cm import targets

CONFIGS = ('configs/digits.py:stage=teacher', 'configs/imagenet64.py:small',
           'configs/imagenet64.py:small,cd', 'configs/imagenet64.py:large',
           'configs/imagenet64.py:large,cd', 'configs/imagenet128.py:small',
           'configs/edm_imagenet64.py', 'configs/edm_imagenet64.py:cd',
           'configs/text2image.py')
TARGETS = ('v5p-64', 'v6e-64', 'v5litepod-64', '8xh100', '8xh200')


def load(config_file):
  """The config of `path:argument`, as --config would load it."""
  path, _, arg = config_file.partition(':')
  spec = importlib.util.spec_from_file_location('config_file',
                                                os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def measure(config_file, name, fit_batch):
  config, target = load(config_file), targets.get(name)
  flops = describe.model_flops(config)['train step']
  start = time.perf_counter()
  step = describe.compile_train_step(config, target)
  per_device = config.batch_size / target.devices
  row = {'config': config_file, 'target': name,
         'per_device_batch': per_device,
         'attention': describe.attention_kernels(config, target),
         'remat': config.model.get('remat', 'none'),
         'usable_gib': target.usable_bytes / describe.GIB,
         'refused': step.refused, 'fits': step.fits(target),
         'compile_s': step.seconds, 'remats': step.remats,
         'note': step.note,
         'gflop_per_image': flops / 1e9,
         'host': f'{platform.processor() or platform.machine()}, '
                 f'{os.cpu_count()} CPUs'}
  if not step.refused:
    bound, limit, mfu = describe.roofline(flops * per_device, step,
                                          target.chip)
    row.update(peak_gib=step.peak / describe.GIB,
               memory_gib={k: v / describe.GIB
                           for k, v in step.memory.items()},
               compiled_flops=step.flops, bound_ms=bound * 1e3,
               bound_by=limit, bound_mfu=mfu)
  if fit_batch:
    best, compiled, tried = describe.fit(
        config, target, {int(per_device): step}
        if per_device == int(per_device) else None)
    row.update(fit_batch=best, fit_compiles=len(tried),
               fit_peak_gib=compiled.peak / describe.GIB if best else None)
    if best:
      row['fit_bound_ms'] = describe.roofline(
          flops * best, compiled, target.chip)[0] * 1e3
  row['wall_s'] = time.perf_counter() - start
  return row


def table(rows):
  """The markdown table of `rows`, one per (config, target): a row with a
  fit search wins over one without."""
  best = {}
  for r in rows:
    key = (r['config'], r['target'])
    if key not in best or 'fit_batch' in r:
      best[key] = r
  rows = list(best.values())
  lines = ['| config | target | per-device batch | peak GiB (usable) | fits '
           '| largest batch that fits | roofline ms/step (bound) | compile s |',
           '|---|---|---|---|---|---|---|---|']
  for r in rows:
    if 'error' in r:
      lines.append(f"| {r['config']} | {r['target']} | - | {r['error']} | "
                   'no | - | - | - |')
      continue
    # The verdict against the table's usable memory now.
    usable = targets.get(r['target']).usable_bytes / describe.GIB
    if r['refused']:
      memory, bound, fits = 'refused by the compiler', '-', False
    else:
      memory = f"{r['peak_gib']:.3g} ({usable:.3g})" + (
          ', cuBLAS matmuls' if r.get('note') else '')
      bound = f"{r['bound_ms']:.3g} ({r['bound_by']})"
      fits = r['peak_gib'] <= usable
    # Unsearched, a batch that fits is still a lower bound on the largest.
    largest = r.get('fit_batch', f"≥ {r['per_device_batch']:g}" if fits
                    else '-')
    fits = 'yes' if fits else 'no'
    lines.append(f"| {r['config']} | {r['target']} | "
                 f"{r['per_device_batch']:g} | {memory} | {fits} | {largest} "
                 f"| {bound} | {r['compile_s']:.0f} |")
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--results', required=True,
                      help='JSON lines, appended to; pairs in it are skipped.')
  parser.add_argument('--configs', nargs='+', default=CONFIGS,
                      help='path:argument of each config (space-separated).')
  parser.add_argument('--targets', nargs='+', default=TARGETS)
  parser.add_argument('--fit', action='store_true',
                      help='Also search the largest per-device batch.')
  parser.add_argument('--table', action='store_true',
                      help='Print the results as markdown and exit.')
  args = parser.parse_args()
  rows = []
  if os.path.exists(args.results):
    with open(args.results, encoding='utf-8') as f:
      rows = [json.loads(line) for line in f if line.strip()]
  if args.table:
    print(table(rows))
    return
  done = {(r['config'], r['target']) for r in rows}
  for config_file in args.configs:
    for name in args.targets:
      if (config_file, name) in done:
        continue
      print(f'{config_file} on {name} ...', flush=True)
      try:
        row = measure(config_file, name, args.fit)
      except errors.UserError as e:  # E.g. a mesh the devices cannot fill.
        row = {'config': config_file, 'target': name, 'error': str(e)}
      except Exception as e:  # pylint: disable=broad-except
        # Recorded, so that one pair's failure does not end a long run.
        first = str(e).strip().splitlines()[0] if str(e).strip() else ''
        row = {'config': config_file, 'target': name,
               'error': f'{type(e).__name__}: {first}'}
      with open(args.results, 'a', encoding='utf-8') as f:
        f.write(json.dumps(row) + '\n')
      done.add((config_file, name))
      print(table([row]).splitlines()[-1], flush=True)


if __name__ == '__main__':
  main()
