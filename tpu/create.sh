#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Create a TPU VM or pod slice (every host of a slice is one worker).
#   tpu/create.sh --name my-tpu --zone us-central2-b --type v4-32 [--project P] [--spot] [--dry-run]
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

TYPE="v4-8"
VERSION=""
SPOT=0
usage() { sed -n '3,4p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --type) TYPE="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    *) common_option "$@"; shift "$SHIFT" ;;
  esac
done

# The runtime image that matches the TPU generation.
if [[ -z "$VERSION" ]]; then
  case "$TYPE" in
    v4-*) VERSION="tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) VERSION="v2-alpha-tpuv5-lite" ;;
    v5p-*) VERSION="v2-alpha-tpuv5" ;;
    v6e-*) VERSION="v2-alpha-tpuv6e" ;;
    *) die "--type $TYPE: give --version too (known types: v4-*, v5litepod-*, v5p-*, v6e-*)" ;;
  esac
fi

gcloud_flags
cmd=(gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_FLAGS[@]}" --accelerator-type="$TYPE" --version="$VERSION")
if [[ "$SPOT" == 1 ]]; then
  cmd+=(--spot)
fi
run "${cmd[@]}"
