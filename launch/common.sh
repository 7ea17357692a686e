# shellcheck shell=bash
# What launch/tpu.sh and launch/xpk.sh share, sourced by each from beside
# itself: copy it along with either.

if (( BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404 )); then
  echo "error: needs bash 4.4 or newer (macOS: brew install bash), not $BASH_VERSION" >&2
  exit 1
fi

# The launcher that sourced this file: its header is its usage, and its name
# starts its log lines.
LAUNCHER=${BASH_SOURCE[1]}

usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p;}' "$LAUNCHER"; }
log() { printf '[%s %s] %s\n' "${LAUNCHER##*/}" "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
# Any value but 0 or empty: a mistyped DRY_RUN=true must not launch anything.
dry() { [[ -n $DRY_RUN && $DRY_RUN != 0 ]]; }

# One word quoted for a shell, plain words left as they are, so that printed
# commands stay readable and can be pasted.
q() {
  if [[ $1 =~ ^[-A-Za-z0-9_./:=@%+,]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
quote_all() {
  local words=() w
  for w in "$@"; do words+=("$(q "$w")"); done
  printf '%s' "${words[*]}"
}

# Runs a command, or prints it in a dry run: on fd 3, the script's stdout, which
# survives inside $(...).
exec 3>&1
x() {
  if dry; then
    printf '+ %s\n' "$(quote_all "$@")" >&3
  else
    log "+ $(quote_all "$@")"
    "$@"
  fi
}

# A setting with no usable default: a dry run shows a placeholder.
need() {
  local name=$1 why=$2
  if [[ -z ${!name} ]]; then
    dry || die "set $name: $why"
    printf -v "$name" '<%s>' "$name"
  fi
}

# shellcheck disable=SC2034  # for the launchers
REPO_ROOT=$(cd "$(dirname "$LAUNCHER")/.." && pwd)

# The settings both launchers read alike (their headers document them); each
# sets its own after sourcing this file.
NAME=${NAME:-multistep-cm}
PROJECT=${PROJECT:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5litepod-64}
CREATE_ARGS=${CREATE_ARGS:-}
CONFIG=${CONFIG:-configs/imagenet64.py}
BUCKET=${BUCKET:-}
WORKDIR=${WORKDIR:-${BUCKET:+gs://$BUCKET/multistep_cm/$NAME}}
TFDS_DATA_DIR=${TFDS_DATA_DIR:-${BUCKET:+gs://$BUCKET/tensorflow_datasets}}
EXTRA_ARGS=${EXTRA_ARGS:-}
DRY_RUN=${DRY_RUN:-0}

# The training program's "preempted after saving, rerun to resume".
# shellcheck disable=SC2034  # for the launchers
EXIT_PREEMPTED=75

# Checked before anything costs money: every run reads and writes on gs://.
need_storage() {
  need WORKDIR 'a gs:// directory for checkpoints and metrics (or set BUCKET)'
  need TFDS_DATA_DIR 'the gs:// directory of the prepared tfds datasets (or set BUCKET)'
}

# The training program's command line, quoted, after the words that start
# python ($@); EXTRA_ARGS is split on spaces.
program_line() {
  local extra=()
  read -r -a extra <<< "$EXTRA_ARGS"
  quote_all "$@" -m multistep_cm.main --config="$CONFIG" --workdir="$WORKDIR" \
            "${extra[@]}"
}

# The launchers' command line: one subcommand, with --dry-run or --help
# anywhere. The arguments before -- map each subcommand to its function
# (verb=function), in the order an unknown subcommand's error lists them.
main() {
  local table=() verbs=() entry
  while [[ $1 != -- ]]; do table+=("$1"); verbs+=("${1%%=*}"); shift; done
  shift
  local sub='' arg
  for arg in "$@"; do
    case $arg in
      --dry-run) DRY_RUN=1 ;;
      -h|--help|help) usage; return 0 ;;
      -*) die "unknown option $arg (see launch/${LAUNCHER##*/} --help)" ;;
      *) [[ -z $sub ]] || die "one subcommand at a time, got '$sub' and '$arg'"
         sub=$arg ;;
    esac
  done
  [[ -n $sub ]] || { usage >&2; return 2; }
  for entry in "${table[@]}"; do
    if [[ ${entry%%=*} == "$sub" ]]; then "${entry#*=}"; return; fi
  done
  local list
  printf -v list '%s, ' "${verbs[@]:0:${#verbs[@]}-1}"
  die "unknown subcommand '$sub': ${list%, } or ${verbs[-1]}"
}
