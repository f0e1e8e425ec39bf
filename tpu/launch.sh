#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Start the same `jaxfound pretrain` on every worker (in the background; logs in ~/jaxfound-train.log).
#   tpu/launch.sh --name my-tpu --zone us-central2-b --config configs/gpt2_small_clm.yaml [--dry-run] [-- key=value ...]
# run.dir must be a directory every worker sees (e.g. a Filestore/NFS mount): checkpoints are written jointly.
# jax.distributed finds the other workers of a TPU slice by itself; no coordinator address is needed.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

CONFIG="configs/bert_base_mlm.yaml"
usage() { sed -n '3,6p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) CONFIG="$2"; shift 2 ;;
    --) shift; break ;;
    *) common_option "$@"; shift "$SHIFT" ;;
  esac
done

overrides=""
for kv in "$@"; do
  [[ "$kv" == *=* ]] || die "override '$kv': expected section.key=value"
  overrides+=" $(printf '%q' "$kv")"
done
gcloud_flags
train="cd ~/$REMOTE_DIR && nohup ~/$REMOTE_VENV/bin/jaxfound pretrain --config $(printf '%q' "$CONFIG")$overrides"
train+=" > ~/$REMOTE_LOG 2>&1 < /dev/null &"
run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${GCLOUD_FLAGS[@]}" --command="$train"
