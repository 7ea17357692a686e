#!/usr/bin/env bash
# Trains on a GKE cluster made by xpk (TPU slices, several of them joined
# over the data-center network, or GPU nodes), from a container image of this
# project, and has the cluster restart the run after each preemption.
#
# Needs, on the machine that runs this script:
#   - xpk (`pip install xpk`), with the gcloud CLI authenticated and kubectl,
#     and a cluster made by `xpk cluster create` (workloads run only there);
#   - for `build`, docker, allowed to push to IMAGE's registry (Artifact
#     Registry: `gcloud auth configure-docker REGION-docker.pkg.dev`), from
#     which the cluster's nodes may pull;
#   - a GCS bucket, readable and writable by the nodes, for WORKDIR
#     (checkpoints, metrics, samples) and for the prepared tfds datasets, as
#     for launch/tpu.sh (tfds build ... --data_dir=gs://BUCKET/tensorflow_datasets
#     --file_format=array_record).
#
# Usage:
#   launch/xpk.sh SUBCOMMAND [--dry-run]
#     build    docker build IMAGE from this checkout (docker/Dockerfile.tpu or
#              docker/Dockerfile.gpu, see IMAGE_KIND) and push it
#     create   start the workload: one training process per host, on
#              NUM_SLICES slices of ACCELERATOR_TYPE, restarted on preemption
#     status   list the workload (xpk workload list)
#     wait     wait until the workload has ended: exit 0 if it succeeded, 125
#              if it failed, 124 if WAIT_S ran out first (xpk's codes)
#     delete   delete the workload (the run stops; its checkpoints stay)
#   --dry-run (or DRY_RUN=1) prints the commands instead of running them.
#
#   IMAGE=us-docker.pkg.dev/my-project/images/multistep-cm:v1 launch/xpk.sh build
#   CLUSTER=my-cluster BUCKET=my-bucket NAME=cm-imagenet64 \
#   IMAGE=us-docker.pkg.dev/my-project/images/multistep-cm:v1 launch/xpk.sh create
#
# Preemption: the cluster, not this script, keeps the run going, so nothing
# here needs to stay up. xpk runs the workload as a JobSet that is restarted
# (all hosts together, at most MAX_RESTARTS times) when a host's program exits
# with one of the restart codes: xpk's own (42, and 127-255, which covers a
# program killed by a signal) and 75, the program's "preempted after saving:
# run again to resume" (--restart-on-exit-codes=75), also its code when
# another host's program was lost: killed, or its node gone (the others name
# it within --heartbeat_timeout_s, default 100 s; or abort with 134 at once
# when it ran jax's coordinator). Any other non-zero code (1: an error) fails
# the workload without a restart. Each restart runs the same command, which
# resumes from the newest checkpoint in WORKDIR.
# A host that is to stop gets SIGTERM, and SIGKILL GRACE_S seconds later
# (--termination-grace-period-seconds); the program saves a checkpoint on
# SIGTERM and exits 75, so GRACE_S must cover saving one. That holds when
# Kueue evicts the workload for one of a higher priority, on deletion, and on
# maintenance. A Spot VM that is reclaimed gives its pods only 15 s, whatever
# GRACE_S says (120 s if the node pool is configured for it): a save that
# does not finish there ends in SIGKILL (exit 137, also restarted), and the
# run resumes from its last periodic checkpoint.
# xpk starts the command in a bash wrapper that passes SIGTERM on to its
# child; exec makes that child python itself, not a subshell that might keep
# the signal to itself.
#
# Settings (environment variables, defaults in brackets):
#   CLUSTER []                the xpk cluster (create, status, wait, delete)
#   NAME [multistep-cm]       the workload: lowercase letters, digits and -,
#                             at most 40 characters
#   PROJECT [gcloud's]        ZONE [gcloud's]
#   ACCELERATOR_TYPE [v5litepod-64]  an xpk type: TPUs as v5litepod-64,
#                             v5p-128, v6e-256, tpu7x-...; GPUs as h100-80gb-8,
#                             h200-141gb-8, b200-8 (one node each)
#   NUM_SLICES [1]            TPU slices (or GPU nodes) joined into one run
#   IMAGE []                  the image to build and run, with a tag of its
#                             own (a version, a commit): every restart pulls it
#   IMAGE_KIND [tpu for a TPU type, else gpu]  which docker/Dockerfile.* builds it
#   PLATFORM [linux/amd64]    the nodes' platform, for `build` (gb200: linux/arm64)
#   BUILD_ARGS []             more flags for `docker build`, split on spaces
#                             (--build-arg JAX_CUDA=cuda12, --no-cache, ...)
#   CONFIG [configs/imagenet64.py]  relative to the repository root, as in
#                             the image's working directory
#   BUCKET []                 WORKDIR [gs://$BUCKET/multistep_cm/$NAME]
#                             TFDS_DATA_DIR [gs://$BUCKET/tensorflow_datasets]
#   EXTRA_ARGS []             more flags for multistep_cm.main, split on spaces
#   MAX_RESTARTS [50]         restarts of the whole workload before it fails
#   GRACE_S [300]             seconds from SIGTERM to SIGKILL (see above)
#   PRIORITY [medium]         very-low, low, medium, high or very-high: Kueue
#                             evicts lower priorities to run higher ones
#   CREATE_ARGS []            more flags for `xpk workload create`, split on
#                             spaces (--scheduler=..., --docker-image-pull-secret=...)
#   WAIT_S []                 wait: give up after this many seconds (xpk's
#                             default: a week)
#
# Several slices: NUM_SLICES=N gives each host the MEGASCALE_* variables
# (coordinator, slice count, slice id); jax.distributed finds its peers on GKE
# by itself, so the program starts as it does on one slice. The links between
# slices are much slower than those within one: make the mesh's data axis the
# one that crosses them, with fsdp inside a slice. Not tested with this
# project, nor are GPU clusters, whose multi-node networking xpk configures.

set -euo pipefail
COMMON=$(dirname "${BASH_SOURCE[0]}")/common.sh
[[ -f $COMMON ]] ||
  { echo "error: $COMMON is missing: copy launch/common.sh along with ${BASH_SOURCE[0]##*/}" >&2; exit 1; }
# shellcheck source=common.sh source-path=SCRIPTDIR
source "$COMMON"

CLUSTER=${CLUSTER:-}
ZONE=${ZONE:-}
NUM_SLICES=${NUM_SLICES:-1}
IMAGE=${IMAGE:-}
PLATFORM=${PLATFORM:-linux/amd64}
BUILD_ARGS=${BUILD_ARGS:-}
MAX_RESTARTS=${MAX_RESTARTS:-50}
GRACE_S=${GRACE_S:-300}
PRIORITY=${PRIORITY:-medium}
WAIT_S=${WAIT_S:-}

# xpk's names for TPUs: v4-8, v5litepod-16, v5p-8, v6e-256, tpu7x-...
is_tpu() { [[ $ACCELERATOR_TYPE =~ ^(v[0-9]|tpu) ]]; }
if is_tpu; then IMAGE_KIND=${IMAGE_KIND:-tpu}; else IMAGE_KIND=${IMAGE_KIND:-gpu}; fi

# Checked here, in one line, rather than by xpk after it has talked to the
# cluster.
check_name() {
  [[ $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ && ${#NAME} -le 40 ]] ||
    die "NAME is '$NAME'; xpk wants lowercase letters, digits and -, starting with a letter, at most 40 characters"
}
check_count() {
  local name=$1
  [[ ${!name} =~ ^[0-9]+$ ]] || die "$name is '${!name}'; a whole number"
}

scope() {
  if [[ -n $PROJECT ]]; then printf '%s\n' --project="$PROJECT"; fi
  if [[ -n $ZONE ]]; then printf '%s\n' --zone="$ZONE"; fi
}

# Every restart pulls IMAGE again: under a tag that moves, a resumed run could
# continue with other code than it started with.
check_tag() {
  local last=${IMAGE##*/}
  if [[ $IMAGE != *@sha256:* && ( $last != *:* || $last == *:latest ) ]]; then
    log "warning: IMAGE $IMAGE has no tag of its own; a restarted run pulls whatever it names then"
  fi
}

build() {
  need IMAGE 'the image to build, with its tag (e.g. REGION-docker.pkg.dev/PROJECT/REPO/multistep-cm:TAG)'
  check_tag
  local dockerfile=docker/Dockerfile.$IMAGE_KIND
  [[ -f $REPO_ROOT/$dockerfile ]] || die "IMAGE_KIND is '$IMAGE_KIND'; tpu or gpu"
  local extra=()
  read -r -a extra <<< "$BUILD_ARGS"
  # The context is the whole checkout; .dockerignore keeps it to what the
  # image needs.
  x docker build --platform="$PLATFORM" --file="$REPO_ROOT/$dockerfile" \
      --tag="$IMAGE" "${extra[@]}" "$REPO_ROOT"
  x docker push "$IMAGE"
}

create() {
  need CLUSTER 'the xpk cluster to run on'
  need IMAGE 'the image to run, with its tag (see build)'
  need_storage
  check_name
  check_tag
  check_count NUM_SLICES
  check_count MAX_RESTARTS
  check_count GRACE_S
  local type_flag=--device-type
  if is_tpu; then type_flag=--tpu-type; fi
  # Runs in the image's working directory, where configs/ is, through xpk's
  # bash wrapper; exec makes python the process that the wrapper signals.
  local program
  program="exec $(program_line python)"
  local more=()
  read -r -a more <<< "$CREATE_ARGS"
  local s=()
  mapfile -t s < <(scope)
  x xpk workload create --cluster="$CLUSTER" --workload="$NAME" "${s[@]}" \
      --docker-image="$IMAGE" "$type_flag=$ACCELERATOR_TYPE" \
      --num-slices="$NUM_SLICES" --priority="$PRIORITY" \
      --max-restarts="$MAX_RESTARTS" --restart-on-exit-codes="$EXIT_PREEMPTED" \
      --termination-grace-period-seconds="$GRACE_S" \
      --env="TFDS_DATA_DIR=$TFDS_DATA_DIR" \
      --command="$program" "${more[@]}"
  if ! dry; then
    log "started; follow it with: launch/xpk.sh status (or wait), and in the cluster's logs"
  fi
}

status() {
  need CLUSTER 'the xpk cluster the workload runs on'
  check_name
  local s=()
  mapfile -t s < <(scope)
  x xpk workload list --cluster="$CLUSTER" "${s[@]}" --filter-by-job="$NAME"
}

wait_done() {
  need CLUSTER 'the xpk cluster the workload runs on'
  check_name
  local s=() timeout=()
  mapfile -t s < <(scope)
  if [[ -n $WAIT_S ]]; then check_count WAIT_S; timeout=(--timeout="$WAIT_S"); fi
  x xpk workload list --cluster="$CLUSTER" "${s[@]}" \
      --wait-for-job-completion="$NAME" "${timeout[@]}"
}

delete() {
  need CLUSTER 'the xpk cluster the workload runs on'
  check_name
  local s=()
  mapfile -t s < <(scope)
  # --force: no prompt, so that the script also works without a terminal.
  x xpk workload delete --cluster="$CLUSTER" "${s[@]}" --workload="$NAME" --force
}

main build=build create=create status=status wait=wait_done delete=delete -- "$@"
