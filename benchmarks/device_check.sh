#!/usr/bin/env bash
# The accelerator measurement in one command of about six minutes: the MFU
# table of the ImageNet64 small model (batch 128 per chip) and the levers of
# benchmarks/NOTES.md, each as far as the time budget allows.
#
#   bash benchmarks/device_check.sh [OUT_DIR]
#
# Writes OUT_DIR/device_check.md (one table, a row per measured program, rows
# kept as they come so a run cut short keeps what it measured) and
# OUT_DIR/device_check.log. OUT_DIR defaults to $OUT, else ./device_check.
# Needs jax (with the accelerator's plugin), flax, optax, orbax-checkpoint
# and ml_collections; no TensorFlow, tfds or clu. Where ml_collections is
# missing, a wheel of it in .whl/ is installed to /tmp/site (pip download
# --no-deps ml_collections -d .whl; it is pure Python). DEVICE_CHECK_SECONDS
# sets the budget (default 360), DEVICE_CHECK_CONFIG the config (default
# configs/imagenet64.py:small).
set -uo pipefail
cd "$(dirname "$0")/.." || exit
out=${1:-${OUT:-device_check}}
budget=${DEVICE_CHECK_SECONDS:-360}
config=${DEVICE_CHECK_CONFIG:-configs/imagenet64.py:small}
python=${PYTHON:-python3}
table=$out/device_check.md
log=$out/device_check.log

if ! "$python" -c 'import ml_collections' 2>/dev/null; then
  if ! compgen -G '.whl/ml_collections-*.whl' >/dev/null; then
    echo 'error: ml_collections is not installed and .whl/ holds no wheel of it (pip download --no-deps ml_collections -d .whl)' >&2
    exit 2
  fi
  "$python" -m pip install -q --no-index --no-deps --target /tmp/site \
    .whl/ml_collections-*.whl || exit 2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
mkdir -p "$out"

{
  echo "# Device check, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  "$python" -c 'import jax; d = jax.devices()[0]; print(f"{jax.device_count()} x {d.device_kind}, jax {jax.__version__}")'
  echo
  echo '| run | program | ms/call | bound ms | images/s per chip | GFLOP per image | TFLOP/s per chip | MFU | compile s | scratch GiB | peak GiB |'
  echo '|---|---|---|---|---|---|---|---|---|---|---|'
} > "$table"

start=$SECONDS
# measure LABEL LIMIT_S [XLA_FLAGS] -- MFU.PY FLAGS...: one run of mfu.py,
# skipped when less than LIMIT_S of the budget is left, stopped at LIMIT_S.
measure() {
  local label=$1 limit=$2 xla=$3
  shift 4
  local left=$((budget - (SECONDS - start)))
  if ((left < limit)); then
    echo "| $label | skipped: ${left} s of the budget left, it needs ${limit} s |" >> "$table"
    return
  fi
  echo "== $label (XLA_FLAGS=$xla) $*" >> "$log"
  XLA_FLAGS=$xla timeout "$limit" "$python" benchmarks/mfu.py \
    --config="$config" --repeats=5 --label="$label" "$@" \
    2>&1 | tee -a "$log" | sed -un "s/^measured: |/| $label |/p" >> "$table"
  local status=${PIPESTATUS[0]}
  ((status == 0)) || echo "| $label | stopped: exit $status after $((SECONDS - start)) s in all (see the log) |" >> "$table"
}

# The table of the issue's targets: teacher and CD steps, the 8-step
# student, the bare pass (framework overhead) and the EMA update.
measure 'scan, batch 128' 200 '' -- --per_device_batch=128 \
  --stages=teacher,cd --samplers=student
# The levers, most telling first (predictions in benchmarks/NOTES.md).
measure 'remat dots_saveable, batch 256' 80 '' -- --per_device_batch=256 \
  --config.model.remat=dots_saveable --stages=teacher --samplers= --noema --nobare
measure 'unscanned, batch 128' 150 '' -- --per_device_batch=128 \
  --config.model.scan=False --stages=teacher --samplers= --noema --nobare
measure 'bf16 norm statistics, batch 128' 70 '' -- --per_device_batch=128 \
  --config.model.norm_float32=False --stages=teacher --samplers= --noema --nobare
measure 'no Triton GEMM, batch 128' 70 '--xla_gpu_enable_triton_gemm=false' -- \
  --per_device_batch=128 --stages=teacher --samplers= --noema --nobare
measure 'remat full, batch 256' 80 '' -- --per_device_batch=256 \
  --config.model.remat=full --stages=teacher --samplers= --noema --nobare
echo >> "$table"
echo "Total $((SECONDS - start)) s." >> "$table"
cat "$table"
