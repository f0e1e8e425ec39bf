#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Install this jaxfound checkout on every worker of a TPU VM / pod slice (copied, then pip install -e .[tpu]).
#   tpu/setup.sh --name my-tpu --zone us-central2-b [--project P] [--dry-run]
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"

usage() { sed -n '3,4p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  common_option "$@"; shift "$SHIFT"
done

REPO="$(cd "$(dirname "$0")/.." && pwd)"
TARBALL="${TMPDIR:-/tmp}/jaxfound-src.tar.gz"
gcloud_flags

# The source without runs, caches or virtual environments.
run tar -czf "$TARBALL" -C "$REPO" --exclude=.git --exclude=runs --exclude=.venv --exclude=venv --exclude=.ci-venv \
  --exclude=__pycache__ --exclude=.pytest_cache .
run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:jaxfound-src.tar.gz" --worker=all "${GCLOUD_FLAGS[@]}"
install="rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/jaxfound-src.tar.gz -C ~/$REMOTE_DIR"
install+=" && python3 -m venv ~/$REMOTE_VENV && ~/$REMOTE_VENV/bin/pip install -q -U pip"
install+=" && ~/$REMOTE_VENV/bin/pip install -q -e \"\$HOME/${REMOTE_DIR}[tpu]\""
install+=" && ~/$REMOTE_VENV/bin/python -c 'import jax; print(jax.process_index(), jax.device_count())'"
run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${GCLOUD_FLAGS[@]}" --command="$install"
