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
