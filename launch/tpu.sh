#!/usr/bin/env bash
# Trains on a Cloud TPU VM slice (one pod slice, e.g. 64 v5e chips on 16
# hosts) obtained through a queued resource, and keeps it training through
# preemptions.
#
# Needs, on the machine that runs this script:
#   - the gcloud CLI, authenticated (`gcloud auth login`), with a project that
#     has TPU quota for ACCELERATOR_TYPE in ZONE (spot quota for PROVISIONING=spot);
#   - a GCS bucket in the same region, readable and writable by the TPU VMs'
#     service account, for WORKDIR (checkpoints, metrics, samples) and for the
#     prepared tfds datasets, built once from a machine with the data, e.g.
#       tfds build imagenet_resized/64x64 --data_dir=gs://BUCKET/tensorflow_datasets \
#           --file_format=array_record
#     (array_record: random access, which the input pipeline reads);
#   - REPO: a git URL the TPU VMs can clone (default: this checkout's origin).
#
# Usage:
#   launch/tpu.sh SUBCOMMAND [--dry-run]
#     create   queue the TPU and wait until it is ACTIVE
#     install  on every host: clone or update REPO at BRANCH, pip install -e .
#     run      on every host: start training, detached from ssh, and wait until
#              every host's run has ended (the exit code: see below)
#     babysit  create, install and run, again after each preemption, until the
#              run succeeds or fails for a reason other than a preemption
#     delete   delete the queued resource and its TPU
#   --dry-run (or DRY_RUN=1) prints the commands instead of running them.
#
#   BUCKET=my-bucket NAME=cm-imagenet64 launch/tpu.sh babysit 2>&1 | tee babysit.log
#
# Run the babysitter where it can stay up for days (tmux on a workstation, or a
# small VM). It holds no connection open while the run trains: `run` starts
# the program on every host detached from ssh (nohup setsid), then asks the
# hosts every POLL_S seconds, over a short ssh, how their run stands. Each
# start is an attempt with its own id (UTC time and a random token), and each
# host keeps that attempt's files in ~/multistep_cm_run/ATTEMPT/: log (the
# program's output: tail -f it there), pid, and exit_code once it has ended.
# A start does nothing on a host that has the attempt's directory already, so
# neither a dropped connection, nor gcloud retrying a command, nor the start
# sent again for a host it missed, ever runs a second program on a host; a
# host that still runs an older attempt refuses (exit code 1) rather than
# share its chips. A host whose run vanished without an exit code, or that
# does not answer while the queued resource is no longer ACTIVE, or for LOST_S
# seconds, counts as 255, as a dropped ssh connection would. The run's exit
# code, once every host's run has ended, is 75 (start again, to resume) when
# some host's run exited 75 or was killed by a signal (a process killed, or
# its host lost, stops the others with 75; or with jax's abort, 134, when it
# ran the coordinator) and none failed otherwise, else the first non-zero
# one. On any code but 0 and 75 the babysitter looks at the queued resource:
# a TPU that is gone is taken as preempted, an ACTIVE one as a failure. If
# the babysitter itself stops, the run goes on; to follow it to its end,
#   ATTEMPT=<id from the babysitter's log> launch/tpu.sh run
#
# Settings (environment variables, defaults in brackets):
#   NAME [multistep-cm]       queued resource and TPU name
#   PROJECT [gcloud's]        ZONE [us-west4-a]
#   ACCELERATOR_TYPE [v5litepod-64]
#   RUNTIME_VERSION [v2-alpha-tpuv5-lite]  (v5p: v2-alpha-tpuv5,
#                             v6e: v2-alpha-tpuv6e, v4: tpu-ubuntu2204-base)
#   PROVISIONING [spot]       spot | best-effort (gcloud alpha) | reserved | on-demand
#   CREATE_ARGS []            more flags for `queued-resources create`
#                             (--network=..., --service-account=..., ...)
#   REPO [origin's URL]       BRANCH [main]: a branch or tag. A re-created TPU
#                             installs what BRANCH names at that moment: pin a
#                             tag for a long run.
#   CONFIG [configs/imagenet64.py]
#   BUCKET []                 WORKDIR [gs://$BUCKET/multistep_cm/$NAME]
#                             TFDS_DATA_DIR [gs://$BUCKET/tensorflow_datasets]
#   EXTRA_ARGS []             more flags for multistep_cm.main, split on spaces
#   POLL_S [60]               seconds between state checks
#   SETTLE_S [120]            seconds to wait after a failed run before asking
#                             whether the TPU is still there (see babysit)
#   LOST_S [600]              seconds a host may go unanswered (or without the
#                             run, when the start did not reach it) before its
#                             run counts as lost
#   ATTEMPT [a new id]        run: the attempt to start, or to follow when the
#                             hosts have it already
#
# Multi-host start: the hosts of one slice find each other by themselves
# (jax.distributed detects Cloud TPU), so no coordinator address is passed.
#
# Multi-slice (several slices joined over the data-center network) is not
# scripted here. Its routes: `queued-resources create --node-count=N` (one node
# per slice), or xpk on GKE (`xpk workload create --num-slices=N ...`). The
# tooling sets the MEGASCALE_* variables (coordinator, slice count, slice id)
# on every host; the program itself starts the same way. The links between
# slices are much slower than those within one, so the mesh's data axis should
# be the one that crosses them (only gradients travel along it), with fsdp
# inside a slice. Not tested with this project.

set -euo pipefail
COMMON=$(dirname "${BASH_SOURCE[0]}")/common.sh
[[ -f $COMMON ]] ||
  { echo "error: $COMMON is missing: copy launch/common.sh along with ${BASH_SOURCE[0]##*/}" >&2; exit 1; }
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$COMMON"

ZONE=${ZONE:-us-west4-a}
RUNTIME_VERSION=${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}
PROVISIONING=${PROVISIONING:-spot}
REPO=${REPO:-$(git -C "$REPO_ROOT" remote get-url origin 2>/dev/null || true)}
BRANCH=${BRANCH:-main}
POLL_S=${POLL_S:-60}
SETTLE_S=${SETTLE_S:-120}
LOST_S=${LOST_S:-600}
ATTEMPT=${ATTEMPT:-}

# Where the hosts keep the checkout and its virtualenv, relative to the home
# directory that ssh commands start in.
REMOTE_DIR=multistep_cm
RUNS_DIR=multistep_cm_run
# TPU VM images ship an older Python than this project needs; uv brings its own.
PYTHON_VERSION=3.11
# What a run reports for a host it lost track of, as ssh does for a host it
# cannot reach: the babysitter then asks whether the TPU is still there.
EXIT_LOST=255

scope=(--zone="$ZONE")
if [[ -n $PROJECT ]]; then scope+=(--project="$PROJECT"); fi

# The queued resource's state (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ...),
# ABSENT when there is none, UNKNOWN when gcloud could not tell (a network or
# API hiccup the babysitter should outlive).
qr_state() {
  if dry; then
    x gcloud compute tpus queued-resources describe "$NAME" "${scope[@]}" \
        --format='value(state.state)'
    echo ABSENT
    return
  fi
  local out err
  err=$(mktemp)
  if out=$(gcloud compute tpus queued-resources describe "$NAME" "${scope[@]}" \
             --format='value(state.state)' 2>"$err"); then
    echo "${out:-UNKNOWN}"
  elif grep -qi 'not[ _]found' "$err"; then
    echo ABSENT
  else
    log "cannot read the state of $NAME: $(tail -n 1 "$err")"
    echo UNKNOWN
  fi
  rm -f "$err"
}

# Waits until the TPU is ACTIVE; fails if its request ends any other way.
wait_active() {
  if dry; then
    qr_state >/dev/null
    log "dry run: $NAME taken as ACTIVE"
    return
  fi
  local state last=
  while true; do
    state=$(qr_state)
    if [[ $state != "$last" ]]; then log "$NAME is $state"; fi
    last=$state
    case $state in
      ACTIVE) return 0 ;;
      # Spot capacity can take hours to come: keep waiting.
      CREATING|ACCEPTED|PROVISIONING|WAITING_FOR_RESOURCES|UNKNOWN) sleep "$POLL_S" ;;
      *) return 1 ;;
    esac
  done
}

# Queues the request; a refused one (quota, a wrong flag) ends the script.
request() {
  local cmd=(gcloud compute tpus queued-resources create "$NAME" "${scope[@]}"
             --node-id="$NAME" --accelerator-type="$ACCELERATOR_TYPE"
             --runtime-version="$RUNTIME_VERSION")
  case $PROVISIONING in
    spot) cmd+=(--spot) ;;
    # best-effort is only in gcloud's alpha track.
    best-effort) cmd=(gcloud alpha "${cmd[@]:1}" --best-effort) ;;
    reserved) cmd+=(--reserved) ;;
    on-demand) ;;
    *) die "PROVISIONING is '$PROVISIONING'; spot, best-effort, reserved or on-demand" ;;
  esac
  local extra=()
  read -r -a extra <<< "$CREATE_ARGS"
  x "${cmd[@]}" "${extra[@]}" || die "gcloud refused to create $NAME"
}

create() {
  request
  wait_active || die "the request for $NAME ended in state $(qr_state), not ACTIVE"
}

delete() {
  # --force: the TPU goes with its queued resource.
  x gcloud compute tpus queued-resources delete "$NAME" "${scope[@]}" --force --quiet
}

# Runs one shell command line on every host of the slice, in parallel. gcloud
# exits with the first non-zero exit code among the hosts.
on_all_hosts() {
  x gcloud compute tpus tpu-vm ssh "$NAME" "${scope[@]}" --worker=all --command="$1"
}

install() {
  need REPO 'the git URL of this project, which the TPU hosts clone'
  local dir
  dir=$(q "$REMOTE_DIR")
  local steps=(
    "set -e"
    "{ [ -d $dir/.git ] || git clone -q $(q "$REPO") $dir; }"
    "cd $dir"
    "git fetch -q origin $(q "$BRANCH")"
    "git checkout -q --force --detach FETCH_HEAD"
    "python3 -m pip install -q --user uv"
    "python3 -m uv venv -q --allow-existing --python $PYTHON_VERSION .venv"
    'python3 -m uv pip install -q --python .venv/bin/python -e . "jax[tpu]"'
    'git log -1 --format="installed %h %s"'
  )
  local line
  printf -v line '%s; ' "${steps[@]}"
  on_all_hosts "${line%; }"
}

# The run's files on each host, below the ssh home directory: RUNS_DIR/ATTEMPT/
# holds log (the program's output), pid (its wrapper shell's) and exit_code,
# written before the wrapper exits.
# A run is alive while it has no exit code and its wrapper, found by the
# attempt's directory in its command line (a pid can be reused), still runs;
# a directory without a pid is a start under way, unless it is a minute old.
# shellcheck disable=SC2016  # expanded on the hosts
ALIVE='alive() { [ -d "$1" ] && [ ! -e "$1/exit_code" ] || return 1; if [ -s "$1/pid" ]; then ps -ww -o args= -p "$(cat "$1/pid")" 2>/dev/null | grep -qF "$1"; else [ -z "$(find "$1" -maxdepth 0 -mmin +1)" ]; fi; }'

new_attempt() { printf '%s-%04x%04x' "$(date -u +%Y%m%dT%H%M%SZ)" "$RANDOM" "$RANDOM"; }

# Prints the run's exit code from its hosts' (the arguments): EXIT_PREEMPTED
# when some exited with it or were killed by a signal (128 + its number), and
# the rest did too, succeeded or were lost; else the first non-zero one, 0 if
# none.
job_code() {
  local rc first=0 resume=0 other=0
  for rc in "$@"; do
    if (( rc != 0 && first == 0 )); then first=$rc; fi
    if (( rc == EXIT_PREEMPTED || (rc >= 128 && rc != EXIT_LOST) )); then
      resume=1
    elif (( rc != 0 && rc != EXIT_LOST )); then
      other=1
    fi
  done
  if (( resume && !other )); then first=$EXIT_PREEMPTED; fi
  echo "$first"
}

# Starts ATTEMPT on every host, detached from the ssh session, then polls the
# hosts' status files until every host's run has ended. Exit code: job_code's
# of the hosts', EXIT_LOST if a host's run cannot be followed (see the
# header).
# shellcheck disable=SC2016  # the single-quoted snippets expand on the hosts
train() {
  local attempt=$1
  need_storage
  [[ $attempt =~ ^[A-Za-z0-9_.-]+$ ]] || die "ATTEMPT is '$attempt'; letters, digits and ._- only"
  # The hosts' wrapper changes into REMOTE_DIR, its first word, first.
  local program
  program=$(program_line "$REMOTE_DIR" .venv/bin/python)
  # mkdir is the lock that makes a start idempotent: a retried or repeated
  # start finds the directory and does nothing. A host still running another
  # attempt refuses, rather than have two programs fight over its chips.
  # The wrapper shell traps SIGTERM so that it outlives the program (a
  # preempted VM signals every process) and can record its exit code; the
  # rename makes that file appear whole. Only setsid's new session and the
  # redirections let ssh return, and the run outlive it.
  local steps=(
    "r=\$HOME/$RUNS_DIR; d=\$r/$attempt; h=\$(hostname)"
    "$ALIVE"
    'mkdir -p "$r"'
    'busy=; for o in "$r"/*/; do o=${o%/}; [ "$o" = "$d" ] || ! alive "$o" || busy="$busy ${o##*/}"; done'
    'if [ -n "$busy" ] && mkdir "$d" 2>/dev/null'
    "then echo \"$attempt not started on \$h, which still runs:\$busy\" | tee \"\$d/log\""
    'echo 1 > "$d/exit_code"'
    'elif mkdir "$d" 2>/dev/null'
    "then TFDS_DATA_DIR=$(q "$TFDS_DATA_DIR") nohup setsid sh -c $(q 'trap : TERM INT; echo $$ > "$0/pid"; cd "$1" && shift && "$@"; echo $? > "$0/exit_code.tmp"; mv "$0/exit_code.tmp" "$0/exit_code"') \"\$d\" $program < /dev/null > \"\$d/log\" 2>&1 & i=0"
    'while [ ! -s "$d/pid" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done'
    "echo \"$attempt started on \$h\""
    "else echo \"$attempt already started on \$h\""
    'fi'
  )
  local start poll
  printf -v start '%s; ' "${steps[@]}"
  start=${start%; }
  # Alive is asked first: a run that ends in between has its exit code by then.
  steps=(
    "d=\$HOME/$RUNS_DIR/$attempt"
    "$ALIVE"
    'if alive "$d"; then s=running; elif [ -e "$d/exit_code" ]; then s="exit $(cat "$d/exit_code")"; elif [ -d "$d" ]; then s=lost; else s=none; fi'
    "echo \"$attempt \$(hostname) \$s\""
  )
  printf -v poll '%s; ' "${steps[@]}"
  poll=${poll%; }

  log "attempt $attempt; its output is in ~/$RUNS_DIR/$attempt/log on each host"
  on_all_hosts "$start" ||
    log "the start ended with exit code $?; the hosts' status files tell whether it ran"
  if dry; then
    x gcloud compute tpus tpu-vm ssh "$NAME" "${scope[@]}" --worker=all --command="$poll"
    log "dry run: the hosts would be asked every ${POLL_S}s until every run has ended"
    return 0
  fi

  local started=$SECONDS seen=$SECONDS err out rc state last='' summary
  local running none finished codes first line
  err=$(mktemp)
  while true; do
    sleep "$POLL_S"
    rc=0
    out=$(gcloud compute tpus tpu-vm ssh "$NAME" "${scope[@]}" --worker=all \
            --command="$poll" 2>"$err") || rc=$?
    if (( rc != 0 )); then
      # A host that cannot be reached: its TPU may be gone, which the queued
      # resource says sooner than a timeout would.
      state=$(qr_state)
      if [[ $state != ACTIVE && $state != UNKNOWN ]]; then
        log "cannot reach every host (ssh exit code $rc), and $NAME is $state"
        rm -f "$err"
        return "$EXIT_LOST"
      fi
      if (( SECONDS - seen >= LOST_S )); then
        log "no answer from every host for ${LOST_S}s: $(tail -n 1 "$err")"
        rm -f "$err"
        return "$EXIT_LOST"
      fi
      continue
    fi
    seen=$SECONDS
    running=0 none=0 finished=0 codes=()
    while IFS= read -r line; do
      line=${line%$'\r'}  # when ssh was given a terminal
      [[ $line =~ $attempt\ [^\ ]+\ (running|none|lost|exit\ ([0-9]+))$ ]] || continue
      case ${BASH_REMATCH[1]} in
        running) running=$((running + 1)) ;;
        none) none=$((none + 1)) ;;
        lost) finished=$((finished + 1)); codes+=("$EXIT_LOST") ;;
        *) finished=$((finished + 1)); codes+=("${BASH_REMATCH[2]}") ;;
      esac
    done <<< "$out"
    summary="$running running, $finished ended, $none not started"
    if [[ $summary != "$last" ]]; then log "attempt $attempt: $summary"; fi
    last=$summary
    # A host the start did not reach gets it again, which the hosts that have
    # it ignore; but not once a run has ended, when it would wait alone.
    if (( none && !finished && SECONDS - started < LOST_S )); then
      on_all_hosts "$start" || true
      continue
    fi
    if (( running )); then continue; fi
    if (( running + finished + none == 0 )); then
      log "no host answered with the status of $attempt: $(tail -n 1 "$err")"
      rm -f "$err"
      return "$EXIT_LOST"
    fi
    rm -f "$err"
    for (( ; none > 0; none-- )); do codes+=("$EXIT_LOST"); done
    log "attempt $attempt ended; exit codes ${codes[*]}"
    return "$(job_code "${codes[@]}")"
  done
}

# The run resumes by itself from the newest checkpoint in WORKDIR, so after a
# preemption the babysitter only needs a TPU again and the same command.
babysit() {
  local round=0 installed=0 state rc
  # Before anything costs money.
  need REPO 'the git URL of this project, which the TPU hosts clone'
  need_storage
  while true; do
    round=$((round + 1))
    state=$(qr_state)
    log "round $round: $NAME is $state"
    case $state in
      ACTIVE) ;;
      ABSENT) request; wait_active || continue; installed=0 ;;
      CREATING|ACCEPTED|PROVISIONING|WAITING_FOR_RESOURCES)
        wait_active || continue ;;
      UNKNOWN|DELETING) sleep "$POLL_S"; continue ;;
      *)  # FAILED, SUSPENDING, SUSPENDED (a preempted spot TPU)
        # The pause keeps a request that fails at once from being repeated
        # in a tight loop.
        sleep "$POLL_S"
        delete; request; wait_active || continue; installed=0 ;;
    esac

    rc=0
    if (( !installed )); then install || rc=$?; fi
    if (( rc == 0 )); then installed=1; train "$(new_attempt)" || rc=$?; fi

    if dry; then
      log "dry run: one round shown. A real run would stop on exit code 0,"
      log "start another round on $EXIT_PREEMPTED, and on any other code re-create the TPU"
      log "if it is gone, else stop with that code."
      return 0
    fi
    case $rc in
      0) log "the run finished"; return 0 ;;
      "$EXIT_PREEMPTED") log "the run was preempted after saving; resuming" ;;
      *)
        # A preempted host stops answering (EXIT_LOST), or its program dies
        # with some code, before the queued resource says so.
        log "exit code $rc; checking in ${SETTLE_S}s whether $NAME is still there"
        sleep "$SETTLE_S"
        state=$(qr_state)
        if [[ $state == ACTIVE ]]; then
          printf 'error: the run failed with exit code %s on an ACTIVE TPU; not restarting\n' \
              "$rc" >&2
          return "$rc"
        fi
        log "$NAME is $state: taken as a preemption" ;;
    esac
  done
}

run() { train "${ATTEMPT:-$(new_attempt)}"; }

main create=create install=install run=run babysit=babysit delete=delete -- "$@"
