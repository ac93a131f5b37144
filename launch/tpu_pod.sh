#!/usr/bin/env bash
# From nothing to a ddsm_jax run on a Cloud TPU VM slice (every worker runs one JAX process).
#
#   launch/tpu_pod.sh --name=ddsm-celeba --zone=us-west4-a --type=v5litepod-16 \
#       --config=configs/celeba.py --workdir=gs://BUCKET/ddsm/celeba [--project=PROJECT] \
#       [--repo=https://github.com/OWNER/ddsm_jax.git [--branch=main]] [--spot] [--dry-run] \
#       -- --config.data.data_dir=gs://BUCKET/tfds
#
# Steps: create the TPU VM (or reuse a READY one, or replace a preempted one); put the code on
# every worker (git clone --repo, else a tarball of this checkout copied with gcloud scp); install
# Python 3.11 + requirements.txt + jax[tpu]; start `python -m ddsm_jax.main` on all workers under
# nohup with a log file, so a dropped ssh does not stop training. Rerunning the same command after
# a preemption resumes from the latest checkpoint in --workdir. --dry-run prints every command.
set -euo pipefail

readonly JAX_VERSION="0.10.2"
readonly REMOTE_DIR="ddsm_jax"          # on each worker, relative to the home directory
readonly REMOTE_VENV="ddsm_venv"
readonly REMOTE_LOG="ddsm_jax_run.log"
readonly REMOTE_PID="ddsm_jax_run.pid"
# True on a worker whose last run is still alive.
readonly RUN_ALIVE="[ -f ~/$REMOTE_PID ] && kill -0 \"\$(cat ~/$REMOTE_PID)\" 2>/dev/null"
readonly USAGE="usage: launch/tpu_pod.sh --name=NAME --zone=ZONE --type=TYPE --config=FILE --workdir=gs://BUCKET/DIR [--project=ID] [--repo=URL [--branch=REF]] [--runtime=VERSION] [--mode=train|sample] [--spot] [--dry-run] [-- MAIN_FLAGS...]"

die() {
  echo "error: $*" >&2
  exit 2
}

name="" zone="" type="" config="" workdir="" project="" repo="" branch="" runtime="" mode="train"
spot=0 dry_run=0
extra=()
while (($#)); do
  arg="$1"
  shift
  case "$arg" in
    --) extra=("$@"); break ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; echo "$USAGE"; exit 0 ;;
    --dry-run|--dry_run) dry_run=1; continue ;;
    --spot) spot=1; continue ;;
  esac
  # --flag=value or --flag value
  if [[ "$arg" == --*=* ]]; then
    key="${arg%%=*}" value="${arg#*=}"
  elif [[ "$arg" == --* ]]; then
    (($#)) || die "$arg needs a value; $USAGE"
    key="$arg" value="$1"
    shift
  else
    die "unexpected argument '$arg' (flags for ddsm_jax.main go after --); $USAGE"
  fi
  case "$key" in
    --name) name="$value" ;;
    --zone) zone="$value" ;;
    --type) type="$value" ;;
    --config) config="$value" ;;
    --workdir) workdir="$value" ;;
    --project) project="$value" ;;
    --repo) repo="$value" ;;
    --branch) branch="$value" ;;
    --runtime) runtime="$value" ;;
    --mode) mode="$value" ;;
    *) die "unknown flag $key; $USAGE" ;;
  esac
done

missing=()
for flag in name zone type config workdir; do
  [[ -n "${!flag}" ]] || missing+=("--$flag")
done
((${#missing[@]} == 0)) || die "missing ${missing[*]}; $USAGE"
[[ "$workdir" == gs://* ]] || die "--workdir must be a gs:// path that every worker can reach, got '$workdir'"
[[ "$mode" == train || "$mode" == sample ]] || die "--mode must be train or sample, got '$mode'"
[[ -z "$branch" || -n "$repo" ]] || die "--branch needs --repo"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "$repo" && ! -f "$here/$config" ]]; then
  die "--config=$config is not a file of this checkout ($here)"
fi

# The TPU VM software version that matches each accelerator family (override with --runtime).
if [[ -z "$runtime" ]]; then
  case "$type" in
    v5litepod-*|v5e-*) runtime="v2-alpha-tpuv5-lite" ;;
    v5p-*) runtime="v2-alpha-tpuv5" ;;
    v6e-*) runtime="v2-alpha-tpuv6e" ;;
    v4-*|v3-*|v2-*) runtime="tpu-ubuntu2204-base" ;;
    *) die "no default --runtime for --type=$type; pass --runtime=VERSION" ;;
  esac
fi

gcloud_flags=("--zone=$zone")
[[ -z "$project" ]] || gcloud_flags+=("--project=$project")

# One argument as the shell would need it: bare when safe, else in single quotes.
quote() {
  local arg="$1" sq="'"
  if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$arg"
  else
    printf "'%s'" "${arg//$sq/$sq\\$sq$sq}"
  fi
}

# Runs a command, or with --dry-run prints it (quoted so it can be pasted).
run() {
  if ((dry_run)); then
    local arg line="+"
    for arg in "$@"; do
      line+=" $(quote "$arg")"
    done
    echo "$line"
  else
    "$@"
  fi
}

on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$name" "${gcloud_flags[@]}" --worker=all --command="$1"
}

create_vm() {
  local create=(gcloud compute tpus tpu-vm create "$name" "${gcloud_flags[@]}"
    "--accelerator-type=$type" "--version=$runtime")
  ((spot == 0)) || create+=(--spot)
  run "${create[@]}"
}

# 1. The TPU VM: reuse it when READY, replace it when preempted, else create it.
state=""
if ((dry_run)); then
  run gcloud compute tpus tpu-vm describe "$name" "${gcloud_flags[@]}" --format='value(state)'
else
  state="$(gcloud compute tpus tpu-vm describe "$name" "${gcloud_flags[@]}" \
    --format='value(state)' 2>/dev/null || true)"
fi
case "$state" in
  READY)
    echo "TPU VM $name is READY: reusing it"
    # Replacing the code under a live run would break it: leave a live run alone.
    alive="$(gcloud compute tpus tpu-vm ssh "$name" "${gcloud_flags[@]}" --worker=all \
      --command="$RUN_ALIVE && echo \"run alive on \$(hostname)\" || true" 2>/dev/null || true)"
    if [[ "$alive" == *"run alive"* ]]; then
      echo "$alive"
      echo "ddsm_jax.main is still running on $name; nothing to do. Logs:"
      echo "  gcloud compute tpus tpu-vm ssh $name ${gcloud_flags[*]} --worker=0 --command='tail -f ~/$REMOTE_LOG'"
      exit 0
    fi
    ;;
  "") create_vm ;;
  PREEMPTED|TERMINATED|STOPPED)
    echo "TPU VM $name is $state: deleting and creating it again"
    run gcloud compute tpus tpu-vm delete "$name" "${gcloud_flags[@]}" --quiet
    create_vm
    ;;
  *) die "TPU VM $name is $state; wait until it is READY (or delete it) and rerun" ;;
esac

# 2. The code on every worker.
if [[ -n "$repo" ]]; then
  ref_flag=""
  [[ -z "$branch" ]] || ref_flag="--branch $(printf '%q' "$branch")"
  on_all_workers "rm -rf ~/$REMOTE_DIR && git clone --depth=1 $ref_flag $(printf '%q' "$repo") ~/$REMOTE_DIR"
else
  tarball="${TMPDIR:-/tmp}/ddsm_jax_$name.tar.gz"
  run tar -czf "$tarball" -C "$here" --exclude=.git --exclude=.venv --exclude=.ci-venv \
    --exclude=.jax_cache --exclude=workdirs --exclude=__pycache__ --exclude=.pytest_cache .
  run gcloud compute tpus tpu-vm scp "$tarball" "$name:ddsm_jax.tar.gz" "${gcloud_flags[@]}" --worker=all
  on_all_workers "rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/ddsm_jax.tar.gz -C ~/$REMOTE_DIR"
fi

# 3. Python 3.11 (what requirements.txt is pinned for), the requirements and JAX's TPU build.
on_all_workers "set -e; if ! command -v python3.11 >/dev/null; then sudo apt-get -qq update && sudo apt-get -qq install -y python3.11 python3.11-venv; fi; [ -x ~/$REMOTE_VENV/bin/python ] || python3.11 -m venv ~/$REMOTE_VENV; cd ~/$REMOTE_DIR && ~/$REMOTE_VENV/bin/pip install -q --upgrade pip && ~/$REMOTE_VENV/bin/pip install -q -r requirements.txt 'jax[tpu]==$JAX_VERSION'"

# 4. The run, detached on every worker; JAX finds the other workers itself on a TPU slice.
main_args=("--config=$config" "--workdir=$workdir" "--mode=$mode" "${extra[@]}")
main_line="nohup ~/$REMOTE_VENV/bin/python -m ddsm_jax.main$(printf ' %q' "${main_args[@]}")"
on_all_workers "cd ~/$REMOTE_DIR && if $RUN_ALIVE; then echo \"already running (pid \$(cat ~/$REMOTE_PID)) on \$(hostname)\"; else $main_line > ~/$REMOTE_LOG 2>&1 < /dev/null & echo \$! > ~/$REMOTE_PID; fi"

ssh_base="gcloud compute tpus tpu-vm ssh $name ${gcloud_flags[*]}"
if ((dry_run)); then
  echo
  echo "(dry run: nothing was created, copied or started)"
fi
cat <<EOF

Worker 0 writes the progress bar, metrics and checkpoints; follow it with:
  $ssh_base --worker=0 --command='tail -f ~/$REMOTE_LOG'
All workers' last lines:
  $ssh_base --worker=all --command='tail -n 3 ~/$REMOTE_LOG'
After a preemption, rerun this same command: it recreates the VM and resumes from $workdir.
Delete the TPU VM when done (it bills while it exists):
  gcloud compute tpus tpu-vm delete $name ${gcloud_flags[*]} --quiet
EOF
