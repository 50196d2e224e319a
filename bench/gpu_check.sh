#!/usr/bin/env bash
# The GPU check of ftctl train (issue 11, item 6), ready to run on a machine with an NVIDIA GPU.
#
#   bash bench/gpu_check.sh          # on the GPU machine, from the repository root (< 8 min)
#   bash bench/gpu_check.sh --cpu    # the same steps on CPU, small model (every line but CUDA)
#
# It needs a Python with torch (CUDA build), transformers, accelerate, typer, rich,
# scikit-learn, safetensors and pyyaml: $PYTHON, else ./.venv/bin/python, else python3 (the
# device machine's python3 has them all). Nothing is installed or downloaded: ftctl runs from
# this tree (PYTHONPATH). Outputs, logs and summary.json go to $OUT (default
# /tmp/ftctl-gpu-check); the random-weight models are cached in ~/.cache/ftctl-bench.
#
# Steps (GPU mode):
#   1. environment: GPUs, torch/CUDA versions, bf16 support, imports;
#   2. the real shape (hidden 768, 12 layers, vocab 21128, random weights), the seed's job
#      (1,200 new rows + 1,200 replayed, 2 epochs, batch 8, 8 layers frozen) trained by HF
#      Trainer and by ftctl, both in fp32 and both in bf16: samples/s, the ratio, the floor;
#   3. resume on CUDA: `ftctl train` stopped by SIGINT in epoch 2 (checkpoint kept, exit 130),
#      then `--resume`; compared with an uninterrupted run (sha256 of the weights);
#   4. `--nproc 2` (nccl) if two GPUs are there: accuracy and speed against one process.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

MODE=gpu
[ "${1:-}" = "--cpu" ] && MODE=cpu
OUT=${OUT:-/tmp/ftctl-gpu-check}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/ftctl-gpu-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
exec > >(tee "$OUT/gpu_check.log") 2>&1
STARTED=$(date +%s)

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1
export TOKENIZERS_PARALLELISM=false
say() { printf '\n=== %s (%ss)\n' "$*" "$(( $(date +%s) - STARTED ))"; }
ftctl() { "$PY" -m ftctl "$@"; }

if [ "$MODE" = gpu ]; then
  DEV=cuda SHAPE=(--real-shape) NEW_ROWS=0 RESUME_ROWS=400 EPOCHS=2 RESUME_LR=5e-5
else
  DEV=cpu SHAPE=(--random-hidden 64) NEW_ROWS=60 RESUME_ROWS=60 EPOCHS=2 RESUME_LR=1e-3
fi

# ------------------------------------------------------------------ 1. environment
say "1. environment ($MODE mode, $PY)"
[ "$MODE" = gpu ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" - "$MODE" <<'EOF' | tee "$OUT/env.json"
import importlib, json, sys
mode = sys.argv[1]
missing = []
for name in ("torch", "transformers", "accelerate", "typer", "rich", "sklearn", "safetensors",
             "yaml", "ftctl"):
    try:
        importlib.import_module(name)
    except ImportError as exc:
        missing.append(f"{name} ({exc})")
if missing:
    sys.exit("missing Python packages: " + ", ".join(missing))
import torch, transformers, ftctl
env = {"python": sys.version.split()[0], "torch": torch.__version__,
       "transformers": transformers.__version__, "ftctl": ftctl.__version__,
       "cuda": torch.version.cuda, "gpus": torch.cuda.device_count()}
if mode == "gpu":
    if not torch.cuda.is_available():
        sys.exit("torch sees no CUDA GPU: run with --cpu, or on a GPU machine")
    env["gpu"] = torch.cuda.get_device_name(0)
    env["bf16"] = torch.cuda.is_bf16_supported()
print(json.dumps(env))
EOF
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')

# data: the seed's files, or a stratified subset of the new rows (same file for every run)
"$PY" - "$WORK" "$NEW_ROWS" "$RESUME_ROWS" <<'EOF'
import sys
from pathlib import Path
from ftctl.data import load_examples, write_examples
from ftctl.train import stratified_sample
work, n_bench, n_resume = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
new = load_examples("data/incremental_training_data.jsonl")
write_examples(work / "bench_new.jsonl", stratified_sample(new, n_bench, 42) if n_bench else new)
write_examples(work / "resume_new.jsonl", stratified_sample(new, n_resume, 42))
EOF
MODEL=$("$PY" bench/bench_train.py "${SHAPE[@]}" --model-only)
echo "model: $MODEL"

# ------------------------------------------------------------------ 2. speed against Trainer
for prec in fp32 bf16; do
  say "2. HF Trainer vs ftctl, $prec, seed's job on $(wc -l < "$WORK/bench_new.jsonl") new rows"
  if [ "$MODE" = cpu ] && [ "$prec" = bf16 ]; then
    extra=(--skip-hf)  # bf16 matmuls are ~50x slower than fp32 on CPUs without AMX
  else
    extra=()
  fi
  "$PY" bench/bench_train.py --model-path "$MODEL" --device "$DEV" --precision "$prec" \
    --new-data "$WORK/bench_new.jsonl" --epochs "$EPOCHS" "${extra[@]}" --json \
    | tail -1 | tee "$OUT/bench_$prec.json"
done

# ------------------------------------------------------------------ 3. resume
COMMON=(train --new-data "$WORK/resume_new.jsonl" --old-data data/original_training_data.jsonl
        --model-path "$MODEL" --epochs 4 --batch-size 8 --lr "$RESUME_LR" --patience 0 --device "$DEV")
say "3. resume on $DEV: an uninterrupted run, then one stopped by SIGINT and resumed"
ftctl "${COMMON[@]}" --output-path "$WORK/straight" --json > "$OUT/straight.json"
# not through the ftctl function: $! must be the Python process, the one SIGINT is for
"$PY" -m ftctl "${COMMON[@]}" --output-path "$WORK/resumed" > "$WORK/first.out" 2> "$WORK/first.err" &
pid=$!
for _ in $(seq 1200); do
  grep -qE '^epoch 1/4: .* in ' "$WORK/first.err" && break
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.25
done
# a third of an epoch later, so that the stop falls in the middle of epoch 2
took=$(sed -nE 's|^epoch 1/4: .* in ([0-9.]+) s.*|\1|p' "$WORK/first.err" | head -1)
sleep "$("$PY" -c "print(min(float('${took:-3}') / 3, 5))")"
kill -INT "$pid" 2>/dev/null || true
set +e; wait "$pid"; code=$?; set -e
cat "$WORK/first.err" > "$OUT/interrupted.log"
echo "interrupted run: exit $code; $(grep -o 'checkpoint kept.*' "$WORK/first.err" || true)"
[ "$code" = 130 ] || { echo "FAIL: expected exit 130 after SIGINT"; exit 1; }
[ -f "$WORK/resumed/checkpoints/last.pt" ] || { echo "FAIL: no checkpoint kept"; exit 1; }
ftctl "${COMMON[@]}" --output-path "$WORK/resumed" --resume --json > "$OUT/resumed.json"
"$PY" - "$WORK" <<'EOF' | tee "$OUT/resume.json"
import hashlib, json, sys
from pathlib import Path
from ftctl.manifest import read_manifest
work = Path(sys.argv[1])
sha = {k: hashlib.sha256((work / k / "final" / "model.safetensors").read_bytes()).hexdigest()
       for k in ("straight", "resumed")}
m = {k: read_manifest(work / k / "final") for k in sha}
figures = {k: [(r["train_loss"], r["val_loss"]) for r in m[k]["metrics"]] for k in sha}
print(json.dumps({
    "resumed_from_epoch": m["resumed"]["resumed_from_epoch"],
    "resumed_at_batch": m["resumed"]["resumed_at_batch"],
    "precision": m["resumed"]["precision"],
    "identical_to_uninterrupted": sha["straight"] == sha["resumed"],
    "same_losses_every_epoch": figures["straight"] == figures["resumed"],
    "best_epoch": {k: m[k]["best"]["epoch"] for k in sha},
    "val_acc": {k: m[k]["best"]["val_accuracy"] for k in sha},
}))
EOF

# ------------------------------------------------------------------ 4. two processes
if [ "$MODE" = cpu ] || [ "$GPUS" -ge 2 ]; then
  say "4. --nproc 2 on $DEV"
  ftctl "${COMMON[@]}" --output-path "$WORK/two" --nproc 2 --json > "$OUT/nproc2.json"
  "$PY" - "$OUT" <<'EOF' | tee "$OUT/nproc.json"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
one, two = (json.loads((out / f).read_text()) for f in ("straight.json", "nproc2.json"))
rows = one["replay"]["train"] * one["epochs_run"]
print(json.dumps({
    "one_process": {"val_acc": one["val_accuracy"], "samples_per_s": rows / one["elapsed_s"]},
    "two_processes": {"val_acc": two["val_accuracy"], "samples_per_s": rows / two["elapsed_s"],
                      "processes": two["processes"]},
}))
EOF
else
  say "4. --nproc 2: skipped, $GPUS GPU(s) here"
fi

# ------------------------------------------------------------------ summary
say "summary"
"$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.json"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
doc = {"env": json.loads((out / "env.json").read_text())}
for prec in ("fp32", "bf16"):
    b = json.loads((out / f"bench_{prec}.json").read_text())
    doc[prec] = b
    line = f"{prec}: ftctl {b['ftctl']['samples_per_s']} samples/s"
    if "hf_trainer" in b:
        line += (f", HF Trainer {b['hf_trainer']['samples_per_s']} samples/s: "
                 f"{b['speedup']}x; val acc {b['ftctl']['val_acc']} / {b['hf_trainer']['val_acc']}")
    print(line, file=sys.stderr)
doc["resume"] = r = json.loads((out / "resume.json").read_text())
print(f"resume after SIGINT at epoch {r['resumed_from_epoch']} + {r['resumed_at_batch']} "
      f"batches: weights identical {r['identical_to_uninterrupted']}, losses identical "
      f"{r['same_losses_every_epoch']}", file=sys.stderr)
if (out / "nproc.json").is_file():
    doc["nproc2"] = json.loads((out / "nproc.json").read_text())
print(json.dumps(doc, indent=1))
EOF
say "done"
