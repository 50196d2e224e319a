#!/usr/bin/env bash
# The GPU check of ftctl train (issues 11 and 22), ready to run on a machine with an NVIDIA GPU.
#
#   bash bench/gpu_check.sh          # on the GPU machine, from the repository root (~10 min)
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
#      Trainer and by ftctl, each side a whole process (imports, load, train, checkpoints,
#      save), alternated, median of $REPEAT (3) in bf16 (what --precision auto picks on a GPU)
#      and of 1 in fp32: wall time, samples/s, validation accuracy side by side, peak RSS;
#   3. host syncs per step: one epoch under torch.cuda.set_sync_debug_mode("warn"), counted
#      inside the step (target 0) and in all;
#   4. batch sweep: ftctl at batch 8, 32 and 64 with the lr scaled as the batch (5e-6 x b/8):
#      samples/s and validation accuracy;
#   5. resume on CUDA: `ftctl train` stopped by SIGINT in epoch 2 (checkpoint kept, exit 130),
#      then `--resume`; compared with an uninterrupted run (sha256 of the weights);
#   6. `--nproc 2` (nccl) if two GPUs are there: accuracy and speed against one process.
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
  REPEAT=${REPEAT:-3}
else
  DEV=cpu SHAPE=(--random-hidden 64) NEW_ROWS=60 RESUME_ROWS=60 EPOCHS=2 RESUME_LR=1e-3
  REPEAT=${REPEAT:-1}
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
from ftctl.data.examples import load_examples, write_examples
from ftctl.train.mix import stratified_sample
work, n_bench, n_resume = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
new = load_examples("data/incremental_training_data.jsonl")
write_examples(work / "bench_new.jsonl", stratified_sample(new, n_bench, 42) if n_bench else new)
write_examples(work / "resume_new.jsonl", stratified_sample(new, n_resume, 42))
EOF
MODEL=$("$PY" bench/bench_train.py "${SHAPE[@]}" --model-only)
echo "model: $MODEL"

# ------------------------------------------------------------------ 2. speed against Trainer
for prec in bf16 fp32; do
  rounds=$REPEAT extra=()
  [ "$prec" = fp32 ] && rounds=1
  if [ "$MODE" = cpu ] && [ "$prec" = bf16 ]; then
    extra=(--skip-hf)  # bf16 matmuls are ~50x slower than fp32 on CPUs without AMX
  fi
  say "2. HF Trainer vs ftctl, $prec, whole processes, median of $rounds, $(wc -l < "$WORK/bench_new.jsonl") new rows"
  "$PY" bench/bench_train.py --model-path "$MODEL" --device "$DEV" --precision "$prec" \
    --new-data "$WORK/bench_new.jsonl" --epochs "$EPOCHS" --repeat "$rounds" "${extra[@]}" --json \
    | tail -1 | tee "$OUT/bench_$prec.json"
done

# ------------------------------------------------------------------ 3. host syncs per step
PREC=bf16
[ "$MODE" = cpu ] && PREC=fp32
say "3. host syncs per step ($PREC, torch.cuda.set_sync_debug_mode warn)"
"$PY" bench/bench_train.py --model-path "$MODEL" --device "$DEV" --precision "$PREC" \
  --new-data "$WORK/bench_new.jsonl" --sync-check | tail -1 | tee "$OUT/syncs.json"

# ------------------------------------------------------------------ 4. batch sweep
say "4. batch sweep: 8, 32, 64 with the lr scaled as the batch"
: > "$OUT/sweep.jsonl"
for bs in 8 32 64; do
  if [ "$MODE" = gpu ]; then base_lr=5e-6; else base_lr=1e-3; fi
  lr=$("$PY" -c "print(f'{$base_lr * $bs / 8:g}')")
  ftctl --quiet train --new-data "$WORK/bench_new.jsonl" --old-data data/original_training_data.jsonl \
    --model-path "$MODEL" --output-path "$WORK/sweep-$bs" --epochs "$EPOCHS" --batch-size "$bs" \
    --lr "$lr" --patience 0 --device "$DEV" --json > "$WORK/sweep-$bs.json"
  "$PY" - "$WORK/sweep-$bs.json" "$bs" "$lr" <<'EOF' | tee -a "$OUT/sweep.jsonl"
import json, sys
doc, bs, lr = json.load(open(sys.argv[1])), int(sys.argv[2]), sys.argv[3]
rows = doc["replay"]["train"] * doc["epochs_run"]
loop = doc["history"][-1]["elapsed_s"]
print(json.dumps({"batch_size": bs, "lr": lr, "samples_per_s_loop": round(rows / loop, 1),
                  "samples_per_s_whole": round(rows / doc["elapsed_s"], 1),
                  "val_acc_last": doc["history"][-1]["val_accuracy"],
                  "val_acc_kept": doc["val_accuracy"], "best_epoch": doc["best_epoch"]}))
EOF
  rm -rf "$WORK/sweep-$bs"
done

# ------------------------------------------------------------------ 5. resume
COMMON=(train --new-data "$WORK/resume_new.jsonl" --old-data data/original_training_data.jsonl
        --model-path "$MODEL" --epochs 4 --batch-size 8 --lr "$RESUME_LR" --patience 0 --device "$DEV")
say "5. resume on $DEV: an uninterrupted run, then one stopped by SIGINT and resumed"
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

# ------------------------------------------------------------------ 6. two processes
if [ "$MODE" = cpu ] || [ "$GPUS" -ge 2 ]; then
  say "6. --nproc 2 on $DEV"
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
  say "6. --nproc 2: skipped, $GPUS GPU(s) here"
fi

# ------------------------------------------------------------------ summary
say "summary"
"$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.json"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
doc = {"env": json.loads((out / "env.json").read_text())}
for prec in ("bf16", "fp32"):
    b = json.loads((out / f"bench_{prec}.json").read_text())
    doc[prec] = b
    line = f"{prec}: ftctl {b['ftctl']['wall_s']} s ({b['ftctl']['samples_per_s']} samples/s)"
    if "hf_trainer" in b:
        line += (f", HF Trainer {b['hf_trainer']['wall_s']} s: ftctl takes "
                 f"{b['ftctl_wall_vs_trainer']}x Trainer's wall time (pairs {b['pairs']}); "
                 f"val acc {b['ftctl']['val_acc_last']} / {b['hf_trainer']['val_acc_last']}")
    print(line, file=sys.stderr)
doc["syncs"] = s = json.loads((out / "syncs.json").read_text())
print(f"host syncs per step: {s['syncs_in_step_per_step']} inside the step, "
      f"{s['syncs_per_step_all']} in all ({s['steps']} steps)", file=sys.stderr)
doc["sweep"] = [json.loads(x) for x in (out / "sweep.jsonl").read_text().splitlines()]
for r in doc["sweep"]:
    print(f"batch {r['batch_size']} (lr {r['lr']}): {r['samples_per_s_loop']} samples/s in the "
          f"loop, val acc {r['val_acc_last']}", file=sys.stderr)
doc["resume"] = r = json.loads((out / "resume.json").read_text())
print(f"resume after SIGINT at epoch {r['resumed_from_epoch']} + {r['resumed_at_batch']} "
      f"batches: weights identical {r['identical_to_uninterrupted']}, losses identical "
      f"{r['same_losses_every_epoch']}", file=sys.stderr)
if (out / "nproc.json").is_file():
    doc["nproc2"] = json.loads((out / "nproc.json").read_text())
print(json.dumps(doc, indent=1))
EOF
say "done"
