#!/usr/bin/env bash
# Cloud TPU pod lifecycle for flowtok_jax: create a TPU VM (or a queued resource), install this
# repository on every worker, run one command on all workers at once, follow the logs, delete.
#
# Usage: launch/tpu_pod.sh {create|install|run|logs|ssh|delete|all} --name NAME --zone ZONE
#          [--project P] [--type v5p-32] [--version RUNTIME] [--queued] [--spot]
#          [--worker N|all] [--python PY] [--wait] [--keep] [--dry_run] [-- COMMAND...]
#
#   create    gcloud compute tpus tpu-vm create (or queued-resources create with --queued, then
#             wait until the slice is ACTIVE)
#   install   copy `git archive HEAD` to every worker, make ~/flowtok_jax/.venv with --python
#             (default python3.11, the oldest Python setup.py accepts; the TPU VM images ship
#             3.10, so it is installed with apt where missing), pip install -e '.[tpu]'
#   run       start COMMAND on all workers from ~/flowtok_jax (default: launch/train.py
#             --distributed ... must be given after --); output to ~/flowtok_run.log on each;
#             --wait blocks until every worker finishes
#   logs      tail -f the run log of --worker (default 0)
#   ssh       run COMMAND on --worker (default all) in the foreground
#   delete    delete the TPU VM (and its queued resource)
#   all       create, install, run --wait, delete (also on failure unless --keep)
#
# Work directories, data and checkpoints are read and written as files: mount the bucket on every
# worker first (Cloud Storage FUSE), e.g.
#   launch/tpu_pod.sh ssh --name ft-xl --zone us-east5-a -- \
#     'sudo mkdir -p /gcs/BUCKET && sudo chown $USER /gcs/BUCKET && gcsfuse --implicit-dirs BUCKET /gcs/BUCKET'
# Example (FlowTok-XL on a v5p-64, 32 chips in 8 hosts, every host runs the same command):
#   launch/tpu_pod.sh all --name ft-xl --zone us-east5-a --type v5p-64 --queued -- \
#     python launch/train.py --distributed --config configs/flowtok_xl.py \
#       --workdir /gcs/BUCKET/runs/xl --config.data.data_dir=/gcs/BUCKET/tfds
# Runtime versions: v2-alpha-tpuv5 (v5p), v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv6e (v6e),
# tpu-ubuntu2204-base (v4). --dry_run prints the gcloud commands instead of running them.
set -euo pipefail

usage() {
  sed -n '5,7p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

[[ $# -ge 1 ]] || usage
action="$1"
shift

name="" zone="" project="" type="v5p-8" version="v2-alpha-tpuv5" queued=0 spot=0
worker="" wait_run=0 keep=0 dry_run=0 python="python3.11"
cmd=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --type) type="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --worker) worker="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --queued) queued=1; shift ;;
    --spot) spot=1; shift ;;
    --wait) wait_run=1; shift ;;
    --keep) keep=1; shift ;;
    --dry_run) dry_run=1; shift ;;
    --) shift; cmd=("$@"); break ;;
    -h|--help) usage ;;
    *) echo "tpu_pod.sh: unknown option $1" >&2; usage ;;
  esac
done
[[ -n "$name" && -n "$zone" ]] || { echo "tpu_pod.sh: --name and --zone are required" >&2; usage; }

remote_dir="flowtok_jax"
log_file="flowtok_run.log"
common=(--zone "$zone")
[[ -n "$project" ]] && common+=(--project "$project")

# Runs (or, with --dry_run, prints) one command.
x() {
  if [[ $dry_run -eq 1 ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

tpu_ssh() {  # tpu_ssh WORKER COMMAND_STRING
  x gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker="$1" --command "$2"
}

create() {
  local extra=()
  [[ $spot -eq 1 ]] && extra+=(--spot)
  if [[ $queued -eq 1 ]]; then
    x gcloud compute tpus queued-resources create "$name-qr" "${common[@]}" --node-id "$name" \
      --accelerator-type "$type" --runtime-version "$version" "${extra[@]+"${extra[@]}"}"
    [[ $dry_run -eq 1 ]] && return
    echo "waiting for queued resource $name-qr to become ACTIVE ..." >&2
    while true; do
      state="$(gcloud compute tpus queued-resources describe "$name-qr" "${common[@]}" \
        --format='value(state.state)')"
      case "$state" in
        ACTIVE) break ;;
        FAILED|SUSPENDED) echo "queued resource $name-qr is $state" >&2; exit 1 ;;
        *) sleep 30 ;;
      esac
    done
  else
    x gcloud compute tpus tpu-vm create "$name" "${common[@]}" --accelerator-type "$type" \
      --version "$version" "${extra[@]+"${extra[@]}"}"
  fi
}

install() {
  local repo tmpdir archive
  repo="$(cd "$(dirname "$0")/.." && pwd)"
  tmpdir="$(mktemp -d -t flowtok_src.XXXXXX)"
  archive="$tmpdir/flowtok_src.tar.gz"
  x git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
  x gcloud compute tpus tpu-vm scp "$archive" "$name:flowtok_src.tar.gz" "${common[@]}" \
    --worker=all
  local steps="set -e; mkdir -p ~/$remote_dir; tar -xzf ~/flowtok_src.tar.gz -C ~/$remote_dir;"
  steps+=" cd ~/$remote_dir; command -v $python >/dev/null || { sudo apt-get update -qq &&"
  steps+=" sudo apt-get install -y -qq $python $python-venv; };"
  steps+=" $python -m venv .venv; .venv/bin/pip install -q --upgrade pip;"
  steps+=" .venv/bin/pip install -q -e '.[tpu]'"
  tpu_ssh all "$steps"
  rm -rf "$tmpdir"
}

run() {
  [[ ${#cmd[@]} -gt 0 ]] || { echo "tpu_pod.sh run: give the command after --" >&2; exit 2; }
  local quoted
  quoted="$(printf '%q ' "${cmd[@]}")"
  # Every worker runs the same command; jax.distributed.initialize() finds the others from the
  # TPU metadata. `python` means the repository's venv.
  quoted="${quoted/#python /.venv/bin/python }"
  if [[ $wait_run -eq 1 ]]; then
    tpu_ssh all "set -o pipefail; cd ~/$remote_dir && $quoted 2>&1 | tee ~/$log_file"
  else
    tpu_ssh all "cd ~/$remote_dir && nohup $quoted > ~/$log_file 2>&1 < /dev/null &"
    echo "started on all workers; follow with: $0 logs --name $name --zone $zone" >&2
  fi
}

logs() {
  tpu_ssh "${worker:-0}" "tail -n 100 -f ~/$log_file"
}

delete() {
  if [[ $queued -eq 1 ]]; then
    x gcloud compute tpus queued-resources delete "$name-qr" "${common[@]}" --force --quiet
  else
    x gcloud compute tpus tpu-vm delete "$name" "${common[@]}" --quiet
  fi
}

case "$action" in
  create) create ;;
  install) install ;;
  run) run ;;
  logs) logs ;;
  ssh)
    [[ ${#cmd[@]} -gt 0 ]] || { echo "tpu_pod.sh ssh: give the command after --" >&2; exit 2; }
    tpu_ssh "${worker:-all}" "$(printf '%q ' "${cmd[@]}")" ;;
  delete) delete ;;
  all)
    create
    if [[ $keep -eq 0 && $dry_run -eq 0 ]]; then
      trap delete EXIT
    fi
    install
    wait_run=1
    run
    [[ $keep -eq 0 && $dry_run -eq 1 ]] && delete
    ;;
  *) echo "tpu_pod.sh: unknown action $action" >&2; usage ;;
esac
