#!/usr/bin/env bash
# Shared by the tpu/ scripts: option parsing for the TPU name / zone / project, and `run`, which prints
# the command (--dry-run) or runs it. Sourced, never run on its own.
# shellcheck disable=SC2034  # the variables are used by the scripts that source this file

DRY_RUN=0
NAME="${TPU_NAME:-jaxfound}"
ZONE="${TPU_ZONE:-us-central2-b}"
PROJECT="${TPU_PROJECT:-}"
REMOTE_DIR="jaxfound"       # the checkout on every worker, relative to the home directory
REMOTE_VENV="jaxfound-venv" # its virtual environment
REMOTE_LOG="jaxfound-train.log"

# Print a command with shell quoting that can be pasted back into a shell.
show() {
  local out="+" arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+=" $arg"
    else
      out+=" '${arg//\'/\'\\\'\'}'"
    fi
  done
  printf '%s\n' "$out"
}

# Run a command, or only print it under --dry-run.
run() {
  show "$@"
  if [[ "$DRY_RUN" == 0 ]]; then
    "$@"
  fi
}

# The flags every `gcloud compute tpus tpu-vm` call needs.
gcloud_flags() {
  GCLOUD_FLAGS=(--zone="$ZONE")
  if [[ -n "$PROJECT" ]]; then
    GCLOUD_FLAGS+=(--project="$PROJECT")
  fi
}

die() {
  printf 'error: %s\n' "$*" >&2
  exit 2
}

# The options every script takes: --name, --zone, --project, --dry-run, --help. Sets SHIFT to the number of
# arguments used, so a script's loop ends with:  *) common_option "$@"; shift "$SHIFT" ;;
common_option() {
  case "$1" in
    --name|--zone|--project)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      case "$1" in
        --name) NAME="$2" ;;
        --zone) ZONE="$2" ;;
        --project) PROJECT="$2" ;;
      esac
      SHIFT=2 ;;
    --dry-run) DRY_RUN=1; SHIFT=1 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
}
