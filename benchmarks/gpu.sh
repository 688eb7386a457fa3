#!/usr/bin/env bash
# Benchmarks for a lent GPU, in under 8 minutes (each part has a hard time limit):
#   1. the engine table, benchmarks/hypergrad.py on CUDA (timings synchronised, peak = max_memory_allocated)
#   2. the peers table, benchmarks/peers.py on CUDA (if higher / torchopt are installed: pip install -e '.[peers]')
#   3. the GTN recipe (Experiments C and B, unrolled and checkpointed) on CUDA, benchmarks/gtn.py
# Results (commands and their output) go to --out, a Markdown file to paste into docs/results.md.
#
#   benchmarks/gpu.sh [--out runs/gpu/results.md] [--dry-run]
#
# --dry-run: on the CPU, in seconds: checks that every script, flag and config the run uses
# exists (each script's --help, the GTN configs validated) and writes --out with the commands.
# Environment: PYTHON (default: python), BILEVEL_DATA (MNIST cache; random data otherwise,
# and the GTN part needs MNIST).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=runs/gpu/results.md
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT=${2:?--out needs a file}; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument '$1' (use --out FILE or --dry-run)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$DRY" = 0 ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu.sh: no CUDA device visible to $PY; run with --dry-run to check the script on a CPU" >&2
  exit 3
fi
mkdir -p "$(dirname "$OUT")"
STAMP=$(date -u +%Y%m%d-%H%M%S)
{
  echo "## GPU benchmarks ($STAMP UTC)"
  echo
  "$PY" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU (dry run)')"
} > "$OUT"

# part TITLE LIMIT_SECONDS CHECK_COMMAND -- COMMAND...: run COMMAND (dry run: CHECK_COMMAND)
part() {
  local title=$1 limit=$2 check=$3
  shift 4
  { echo; echo "### $title"; echo; echo '```'; echo "\$ $*"; } >> "$OUT"
  if [ "$DRY" = 1 ]; then
    bash -c "$check" > /dev/null
    echo "(dry run: checked, not run)" >> "$OUT"
  else
    local start=$SECONDS
    timeout "$limit" "$@" >> "$OUT" 2>&1 || echo "(stopped: exit $? after $((SECONDS - start)) s; limit ${limit} s)" >> "$OUT"
  fi
  echo '```' >> "$OUT"
  echo "gpu.sh: $title done" >&2
}

export PYTHONWARNINGS=ignore
part "Engine: cost per method (benchmarks/hypergrad.py)" 200 \
  "$PY benchmarks/hypergrad.py --help" -- \
  "$PY" benchmarks/hypergrad.py --device cuda --reps 3
part "Side by side with higher and TorchOpt (benchmarks/peers.py)" 160 \
  "$PY benchmarks/peers.py --help" -- \
  "$PY" benchmarks/peers.py --device cuda --reps 3
part "GTN recipe, Experiments C and B (benchmarks/gtn.py)" 100 \
  "$PY benchmarks/gtn.py --help && $PY -m bilevel config validate gtn/mnist_c_learned.yaml gtn/mnist_b_learned.yaml" -- \
  "$PY" benchmarks/gtn.py --steps 8 --out "runs/gpu/gtn-$STAMP"
echo "gpu.sh: results in $OUT" >&2
