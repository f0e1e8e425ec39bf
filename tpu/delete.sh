#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Delete the TPU VM / pod slice (it bills until deleted).
#   tpu/delete.sh --name my-tpu --zone us-central2-b [--project P] [--dry-run]
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

usage() { sed -n '3,4p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  common_option "$@"; shift "$SHIFT"
done
gcloud_flags
run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_FLAGS[@]}" --quiet
