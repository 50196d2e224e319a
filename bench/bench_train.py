"""Speed benchmark (not a test): `ftctl train` against a Hugging Face Trainer script, each side a
whole process of its own.

Each side is timed from process start to exit: imports, loading the model, the data, training,
evaluation, checkpoints and saving the result. ftctl runs as a user runs it (`python -m ftctl
train ... --json`, default checkpointing: OUTPUT/checkpoints/last.pt after every epoch); the
Trainer side is the script a user would write (`--hf-side`, below: the same split from
ftctl.train.mix.mix_data, the same hyperparameters, the same frozen parameters, dynamic
padding, a checkpoint after every epoch, `save_model` at the end). The sides alternate (HF
first in the first round), ``--repeat`` rounds (3); the median wall time of each side is the
figure, with every pair's ratio beside it, the peak RSS of each process and the validation
accuracy of both on the same validation rows, side by side.

    .venv/bin/python bench/bench_train.py --real-shape --new-rows 200    # 768x12, 400 rows, CPU
    .venv/bin/python bench/bench_train.py --model-path models/demo/base/final
    .venv/bin/python bench/bench_train.py --real-shape --device cuda --precision bf16
    .venv/bin/python bench/bench_train.py --real-shape --sync-check --device cuda   # GPU syncs

``--real-shape``: chinese-roberta-wwm-ext's shape (hidden 768, 12 layers, vocab 21128) with
random weights, built once into ~/.cache/ftctl-bench (bench/deploykit.py). Without a model it
builds a base with `ftctl base` on --old-data (not timed). ``--sync-check``: one ftctl epoch in
this process under ``torch.cuda.set_sync_debug_mode("warn")``; prints the host syncs per step,
inside the step and in all (on a CPU there are none to count).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

CACHE = Path("~/.cache/ftctl-bench").expanduser()
HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
SIDES = ("hf_trainer", "ftctl")


# ------------------------------------------------------------------ the two sides, as processes


def ftctl_command(args, model_path: Path, new: Path, old: Path | None, out: Path) -> list[str]:
    """`ftctl train` as a user runs it (default checkpointing)."""
    cmd = [sys.executable, "-m", "ftctl", "--quiet", "train", "--new-data", str(new)]
    cmd += ["--old-data", str(old)] if old else []
    cmd += ["--model-path", str(model_path), "--output-path", str(out), "--json"]
    return cmd + _hyperparameters(args) + ["--patience", "0", "--precision", args.precision]


def hf_command(args, model_path: Path, new: Path, old: Path | None, out: Path) -> list[str]:
    """This script's Trainer side, in a process of its own."""
    cmd = [sys.executable, str(HERE), "--hf-side", "--model-path", str(model_path)]
    cmd += ["--new-data", str(new)] + (["--old-data", str(old)] if old else [])
    cmd += ["--out", str(out), "--precision", args.precision]
    return cmd + _hyperparameters(args) + (["--hf-pad-to-max"] if args.hf_pad_to_max else [])


def _hyperparameters(args) -> list[str]:
    return [
        *("--epochs", str(args.epochs), "--batch-size", str(args.batch_size)),
        *("--lr", str(args.lr), "--replay-ratio", str(args.replay_ratio)),
        *("--freeze-layers", str(args.freeze_layers), "--seed", str(args.seed)),
        *("--device", args.device),
    ]


def run_side(cmd: list[str], env: dict[str, str]) -> dict:
    """Run one side to its end: wall seconds, its peak RSS (MB) and the JSON it printed last."""
    import threading

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    chunks: dict[str, bytes] = {}
    readers = [
        threading.Thread(target=lambda n=n, s=s: chunks.__setitem__(n, s.read()))
        for n, s in (("out", proc.stdout), ("err", proc.stderr))
    ]
    for t in readers:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS
    wall = time.perf_counter() - t0
    for t in readers:
        t.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(
            f"{' '.join(cmd[:4])}... exited {proc.returncode}:\n"
            + chunks["err"].decode(errors="replace")[-3000:]
        )
    lines = chunks["out"].decode().strip().splitlines()
    doc = json.loads("\n".join(lines)) if lines and lines[0] == "{" else json.loads(lines[-1])
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "doc": doc}


def ftctl_figures(doc: dict) -> dict:
    last = doc["history"][-1]
    return {
        "train_rows": doc["replay"]["train"],
        "val_acc_last": last["val_accuracy"],
        "val_acc_kept": doc["val_accuracy"],  # the best epoch (the base model included)
        "loop_s": last["elapsed_s"],  # the loop: from the base model's scoring to the last epoch
    }


# ------------------------------------------------------------------ the Trainer script


def hf_side(args) -> None:
    """What a user's Trainer script does: imports, load, train (a checkpoint per epoch),
    evaluate, save. Prints one JSON line: train rows, validation accuracy, loop seconds."""
    import numpy as np
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from ftctl.data.examples import load_examples
    from ftctl.model.files import load_classifier
    from ftctl.train.layers import freeze
    from ftctl.train.mix import mix_data

    mix = mix_data(
        load_examples(args.new_data),
        load_examples(args.old_data) if args.old_data else [],
        replay_ratio=args.replay_ratio,
        val_ratio=0.1,
        seed=args.seed,
    )  # the same split ftctl makes
    model, tok = load_classifier(args.model_path, device="cpu")
    freeze(model, args.freeze_layers)  # requires_grad off; Trainer puts it back in train mode
    label2id = {lab: int(i) for i, lab in model.config.id2label.items()}

    def encode(examples):
        pad = "max_length" if args.hf_pad_to_max else False
        enc = tok([e.text for e in examples], truncation=True, max_length=64, padding=pad)
        return [
            {"input_ids": ids, "attention_mask": am, "labels": label2id[e.label]}
            for ids, am, e in zip(enc["input_ids"], enc["attention_mask"], examples, strict=True)
        ]

    train_ds, val_ds = encode(mix.train), encode(mix.val)
    steps = math.ceil(len(train_ds) / args.batch_size) * args.epochs
    targs = TrainingArguments(
        output_dir=str(args.out),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=args.lr,
        weight_decay=0.01,
        warmup_steps=round(steps * 0.1),
        max_grad_norm=1.0,
        eval_strategy="epoch",
        save_strategy="epoch",  # as ftctl's default: a checkpoint to resume from every epoch
        save_total_limit=1,
        logging_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=args.device == "cpu",
        bf16=args.precision == "bf16",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )

    def accuracy(pred):
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        data_collator=DataCollatorWithPadding(tok),
        processing_class=tok,
        compute_metrics=accuracy,
    )
    t0 = time.perf_counter()
    trainer.train()
    loop = time.perf_counter() - t0
    acc = trainer.evaluate()["eval_accuracy"]
    trainer.save_model(str(Path(args.out) / "final"))
    print(json.dumps({"train_rows": len(train_ds), "val_acc_last": acc, "loop_s": loop}))


# ------------------------------------------------------------------ GPU syncs per step


def sync_check(args, model_path: Path, new: Path, old: Path | None, out: Path) -> dict:
    """One ftctl epoch in this process with torch.cuda.set_sync_debug_mode("warn"): every
    host sync raises a warning, counted inside the step (ftctl.train.fit._step) and in all."""
    import torch

    from ftctl.config import TrainConfig
    from ftctl.train import fit as fit_mod
    from ftctl.train.finetune import train

    cuda = args.device.startswith("cuda")
    counts = {"steps": 0, "in_step": 0, "all": 0}
    inside = {"on": False}
    real_step = fit_mod._step

    def step(*a, **kw):
        counts["steps"] += 1
        inside["on"] = True
        try:
            return real_step(*a, **kw)
        finally:
            inside["on"] = False

    def on_warning(message, category, *rest) -> None:
        if "synchronizing" in str(message).lower() or "sync" in category.__name__.lower():
            counts["all"] += 1
            counts["in_step"] += inside["on"]

    fit_mod._step = step
    before = warnings.showwarning
    warnings.showwarning = on_warning
    warnings.simplefilter("always")
    try:
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        train(
            TrainConfig(
                new_data=new, old_data=old, model_path=model_path, output_path=out, epochs=1,
                batch_size=args.batch_size, lr=args.lr, replay_ratio=args.replay_ratio,
                freeze_layers=args.freeze_layers, seed=args.seed, patience=0,
                device=args.device, precision=args.precision, checkpoint="none",
            )
        )  # fmt: skip
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = before
        fit_mod._step = real_step
    n = max(counts["steps"], 1)
    return {
        "device": args.device,
        "steps": counts["steps"],
        "syncs_in_step_per_step": counts["in_step"] / n,
        "syncs_per_step_all": counts["all"] / n,
        "note": "" if cuda else "CPU: torch reports no syncs; run with --device cuda on a GPU",
    }


# ------------------------------------------------------------------ models and data


def real_shape_model() -> Path:
    """chinese-roberta-wwm-ext's shape, random weights (the deploy benchmarks' cached one)."""
    sys.path.insert(0, str(HERE.parent))
    from deploykit import build_base_size_model

    return build_base_size_model(CACHE / "base-old" / "final", seed=0)


def random_model(args) -> Path:
    """A random-weight 12-layer char BERT of hidden ``args.random_hidden`` (cached)."""
    from ftctl.data.examples import load_examples
    from ftctl.model.files import save_classifier
    from ftctl.train.base import build_char_tokenizer, build_classifier, cjk_vocab

    h = args.random_hidden
    out = CACHE / f"random-h{h}-seed{args.seed}" / "final"
    if (out / "model.safetensors").is_file():
        return out
    labels = sorted({e.label for e in load_examples(args.old_data or args.new_data)})
    vocab = cjk_vocab()
    model = build_classifier(
        labels, len(vocab), hidden_size=h, num_layers=12, num_heads=max(1, h // 64),
        intermediate_size=4 * h, max_position=512, seed=args.seed,
    )  # fmt: skip
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_classifier(model, build_char_tokenizer(vocab), tmp)
    os.replace(tmp, out)
    return out


def subset(path: Path, n: int, seed: int, out: Path) -> Path:
    """``n`` rows of ``path``, stratified by intent (the same file for both sides)."""
    from ftctl.data.examples import load_examples, write_examples
    from ftctl.train.mix import stratified_sample

    return write_examples(out, stratified_sample(load_examples(path), n, seed))


# ------------------------------------------------------------------ main


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", type=Path)
    p.add_argument(
        "--real-shape",
        action="store_true",
        help="a random-weight model of chinese-roberta-wwm-ext's shape",
    )
    p.add_argument(
        "--random-hidden",
        type=int,
        default=0,
        help="instead: a random-weight 12-layer char BERT of this hidden size",
    )
    p.add_argument("--new-data", type=Path, default=Path("data/incremental_training_data.jsonl"))
    p.add_argument("--old-data", type=Path, default=Path("data/original_training_data.jsonl"))
    p.add_argument(
        "--new-rows",
        type=int,
        default=0,
        help="use this many rows of --new-data (stratified); replay adds as many old",
    )
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--replay-ratio", type=float, default=0.5)
    p.add_argument("--freeze-layers", type=int, default=8)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="both sides")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of both (0: default)")
    p.add_argument("--repeat", type=int, default=3, help="rounds; the median is the figure")
    p.add_argument("--hf-pad-to-max", action="store_true")
    p.add_argument("--skip-hf", action="store_true", help="time ftctl alone")
    p.add_argument("--sync-check", action="store_true", help="count GPU syncs per step")
    p.add_argument("--json", action="store_true")
    p.add_argument("--model-only", action="store_true", help="build (or find) the model")
    p.add_argument("--hf-side", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return p, p.parse_args(argv)  # fmt: skip


def main() -> None:
    p, args = parse()
    from ftctl.quiet import silence_libraries

    silence_libraries()
    if args.hf_side:
        hf_side(args)
        return
    if args.model_only:
        if not (args.real_shape or args.random_hidden):
            p.error("--model-only needs --real-shape or --random-hidden")
        print(real_shape_model() if args.real_shape else random_model(args))
        return
    work = Path(tempfile.mkdtemp(prefix="ftctl-bench-"))
    try:
        model_path = args.model_path
        if args.real_shape:
            model_path = real_shape_model()
        elif args.random_hidden:
            model_path = random_model(args)
        elif model_path is None:
            from ftctl.train.base import BaseConfig, build_base

            model_path = build_base(
                BaseConfig(data=args.old_data, output_path=work / "base", device=args.device)
            ).final_dir
        new, old = args.new_data, args.old_data
        if args.new_rows:
            new = subset(new, args.new_rows, args.seed, work / "new.jsonl")
        if args.sync_check:
            print(json.dumps(sync_check(args, model_path, new, old, work / "sync")))
            return
        report = compare(args, model_path, new, old, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report) if args.json else render(report))


def compare(args, model_path: Path, new: Path, old: Path | None, work: Path) -> dict:
    """``args.repeat`` rounds, the sides alternated; the median of each side."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    commands = {"hf_trainer": hf_command, "ftctl": ftctl_command}
    sides = ["ftctl"] if args.skip_hf else list(SIDES)
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for round_ in range(args.repeat):
        order = sides if round_ % 2 == 0 else sides[::-1]  # HF first in the first round
        for side in order:
            out = work / f"{side}-{round_}"
            run = run_side(commands[side](args, model_path, new, old, out), env)
            run["figures"] = ftctl_figures(run["doc"]) if side == "ftctl" else run["doc"]
            runs[side].append(run)
            shutil.rmtree(out, ignore_errors=True)
    return summarize(args, runs)


def summarize(args, runs: dict[str, list[dict]]) -> dict:
    out: dict = {
        "device": args.device, "precision": args.precision, "threads": args.threads or None,
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "freeze_layers": args.freeze_layers, "repeat": args.repeat,
    }  # fmt: skip
    for side, side_runs in runs.items():
        walls = [r["wall_s"] for r in side_runs]
        fig = side_runs[0]["figures"]
        wall = statistics.median(walls)
        out[side] = {
            "wall_s": round(wall, 2),
            "walls_s": [round(w, 2) for w in walls],
            "samples_per_s": round(fig["train_rows"] * args.epochs / wall, 2),
            "loop_s": round(statistics.median(r["figures"]["loop_s"] for r in side_runs), 2),
            "val_acc_last": round(fig["val_acc_last"], 4),
            "peak_rss_mb": round(max(r["peak_rss_mb"] or 0 for r in side_runs)),
        }
        if side == "ftctl":
            out[side]["val_acc_kept"] = round(fig["val_acc_kept"], 4)
    if len(runs) == 2:
        pairs = zip(runs["ftctl"], runs["hf_trainer"], strict=True)
        out["pairs"] = [round(f["wall_s"] / h["wall_s"], 2) for f, h in pairs]
        ratio = out["ftctl"]["wall_s"] / out["hf_trainer"]["wall_s"]
        out["ftctl_wall_vs_trainer"] = round(ratio, 2)
    return out


def render(r: dict) -> str:
    lines = [
        f"device {r['device']}, {r['precision']}, threads {r['threads'] or 'default'}; "
        f"{r['epochs']} epochs, batch {r['batch_size']}, lr {r['lr']:g}, {r['freeze_layers']} "
        f"layers frozen; median of {r['repeat']} whole processes per side, alternated",
        f"{'':12}{'wall s':>9}{'samples/s':>11}{'loop s':>9}{'val acc':>9}{'peak RSS':>10}"
        "  runs (s)",
    ]
    for side, label in (("hf_trainer", "HF Trainer"), ("ftctl", "ftctl")):
        if side in r:
            s = r[side]
            lines.append(
                f"{label:12}{s['wall_s']:>9.2f}{s['samples_per_s']:>11.2f}{s['loop_s']:>9.2f}"
                f"{s['val_acc_last']:>9.4f}{s['peak_rss_mb']:>7} MB  {s['walls_s']}"
            )
    if "ftctl_wall_vs_trainer" in r:
        lines.append(
            f"ftctl took {r['ftctl_wall_vs_trainer']:.2f}x Trainer's wall time (pairs: "
            f"{', '.join(f'{x:.2f}' for x in r['pairs'])}); val acc of the last epoch on the "
            f"same rows: ftctl {r['ftctl']['val_acc_last']:.4f}, Trainer "
            f"{r['hf_trainer']['val_acc_last']:.4f} (ftctl keeps its best epoch: "
            f"{r['ftctl']['val_acc_kept']:.4f})"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
