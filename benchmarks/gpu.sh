#!/usr/bin/env bash
# One-GPU throughput of the base-size recipes in bf16 with `jaxfound bench`: BERT-base MLM at seq 512,
# GPT-2 small and medium at seq 1024. Writes one JSON per model plus summary.json, prints a table; < 8 min.
#   bash benchmarks/gpu.sh [--out DIR] [--steps N] [--dry-run]
# DIR defaults to $OUT (the device machine's output folder) or benchmarks/results/gpu.
# Installs nothing when jax with a GPU backend, flax and optax import already (images with CUDA JAX);
# otherwise pip install -e .[gpu] (needs the network; or set PIP_FIND_LINKS to a folder of wheels).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT_DIR="${OUT:-$REPO/benchmarks/results/gpu}"
STEPS=10
WARMUP=3
DRY_RUN=0
PER_MODEL_TIMEOUT=150
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT_DIR="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) printf 'error: unknown option %s (see --help)\n' "$1" >&2; exit 2 ;;
  esac
done

run() {
  printf '+ %s\n' "$*"
  if [[ "$DRY_RUN" == 0 ]]; then
    "$@"
  fi
}

PY="${PYTHON:-python3}"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

# ---- Install what is missing ----
if [[ "$DRY_RUN" == 0 ]] && "$PY" -c "import jax, flax, optax, yaml; assert jax.devices('gpu')" 2>/dev/null; then
  echo "using the installed $("$PY" -c 'import jax; print("jax", jax.__version__, jax.devices()[0].device_kind)')"
else
  run "$PY" -m pip install -q -e ".[gpu]"
fi
if [[ "$DRY_RUN" == 0 ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

# ---- Benchmarks (each under its own time limit, so one slow compile cannot eat the budget) ----
run mkdir -p "$OUT_DIR"
bench() {
  local name="$1"
  shift
  if ! run timeout "$PER_MODEL_TIMEOUT" "$PY" -m jaxfound.cli bench --steps "$STEPS" --warmup "$WARMUP" \
      --out "$OUT_DIR/$name.json" "$@"; then
    echo "$name: failed or timed out (see above)" >&2
  fi
}
bench bert_base_seq512 --config configs/bert_base_mlm.yaml data.seq_len=512 train.batch_size=32 \
  model.vocab_size=30592 model.dtype=bfloat16
bench gpt2_small --config configs/gpt2_small_clm.yaml train.batch_size=32 model.dtype=bfloat16
bench gpt2_medium --config configs/gpt2_medium_clm.yaml train.batch_size=16 model.dtype=bfloat16

# ---- Table ----
if [[ "$DRY_RUN" == 0 ]]; then
  "$PY" - "$OUT_DIR" <<'PYEOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
rows = [json.loads(p.read_text()) | {"name": p.stem} for p in sorted(out.glob("*.json")) if p.name != "summary.json"]
(out / "summary.json").write_text(json.dumps(rows, indent=2))
print(f"\n{'model':<18} {'batch x seq':>12} {'compile s':>9} {'step ms':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>8}")
for r in rows:
    mem = (r.get("memory") or {}).get("peak_bytes_in_use")
    tflops = (r["achieved_flops_per_s"] or 0) / 1e12
    mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "n/a"
    print(f"{r['name']:<18} {r['batch_size']:>5} x {r['seq_len']:<5} {r['compile_s']:>9.1f} {r['step_s_median'] * 1e3:>8.1f} "
          f"{r['tokens_per_s']:>10,.0f} {tflops:>8.1f} {mfu:>6} {mem / 2**30 if mem else float('nan'):>8.1f}")
print(f"\nwrote {out}/*.json")
PYEOF
fi
