#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Copy every worker's training log to logs/<name>/worker-<i>.log and show the tail of worker 0's.
#   tpu/logs.sh --name my-tpu --zone us-central2-b --workers 4 [--out logs] [--dry-run]
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

WORKERS=1
OUT="logs"
usage() { sed -n '3,4p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --workers) WORKERS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    *) common_option "$@"; shift "$SHIFT" ;;
  esac
done
[[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive integer, got '$WORKERS'"

gcloud_flags
run mkdir -p "$OUT/$NAME"
for ((i = 0; i < WORKERS; i++)); do
  run gcloud compute tpus tpu-vm scp "$NAME:$REMOTE_LOG" "$OUT/$NAME/worker-$i.log" --worker="$i" "${GCLOUD_FLAGS[@]}"
done
run tail -n 20 "$OUT/$NAME/worker-0.log"
