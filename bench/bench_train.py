"""Speed benchmark (not a test): ftctl's train loop vs a Hugging Face Trainer on the same job.

Same base model, same data mix and validation split (ftctl.train.mix_data, same seed), same
hyperparameters (epochs, batch size, LR, linear warmup, weight decay, grad clipping), the same
frozen layers (embeddings + first N) and the same precision. Prints, for both: wall time,
training samples/s, final validation accuracy, and the compute floor: the matmul FLOPs each
side actually ran (counted on every nn.Linear call, forward and backward) divided by the
matmul rate this machine reached in the same run (a [2048x768]x[768x3072] GEMM, the shape of
BERT's feed-forward layer, in the same dtype and thread count) -- and how close each got to it.

    .venv/bin/python bench/bench_train.py --real-shape --new-rows 200    # 768x12, 400 rows, CPU
    .venv/bin/python bench/bench_train.py --model-path models/demo/base/final
    .venv/bin/python bench/bench_train.py --real-shape --device cuda --precision bf16

``--real-shape``: chinese-roberta-wwm-ext's shape (hidden 768, 12 layers, vocab 21128) with
random weights, built once into ~/.cache/ftctl-bench (bench/deploykit.py). Without a model it
builds a base with `ftctl base` on --old-data (not timed). The HF side is given dynamic
per-batch padding (DataCollatorWithPadding), its strongest common setup; --hf-pad-to-max
compares with padding="max_length" as many scripts do. Attention's own two matmuls are not
counted (4*L*H FLOPs per token and layer against 24*H*H for the linear layers: < 1% here).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

CACHE = Path("~/.cache/ftctl-bench").expanduser()
GEMM = (2048, 768, 3072)  # tokens x hidden x intermediate: BERT-base's feed-forward layer


# ------------------------------------------------------------------ the compute floor


class FlopMeter:
    """Matmul FLOPs of every nn.Linear call while active: 2*in*out per row forward; when
    autograd records the call, as much again for the weight's gradient (if it trains) and for
    the input's gradient (if the input needs one)."""

    def __enter__(self) -> FlopMeter:
        import torch

        self.flops = 0
        self._linear = torch.nn.Linear
        self._grad = torch.is_grad_enabled
        self._handle = torch.nn.modules.module.register_module_forward_hook(self._hook)
        return self

    def _hook(self, module, inputs, output) -> None:
        if not isinstance(module, self._linear) or not inputs:
            return
        x = inputs[0]
        fwd = 2 * module.in_features * module.out_features * (x.numel() // module.in_features)
        total = fwd
        if self._grad():
            total += fwd if module.weight.requires_grad else 0
            total += fwd if x.requires_grad else 0
        self.flops += total

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def matmul_rate(device: str, precision: str, seconds: float = 1.0) -> float:
    """FLOP/s of a feed-forward-shaped GEMM on ``device`` in ``precision`` (fp32: IEEE)."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    m, k, n = GEMM
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        for _ in range(3):
            a @ b
        sync()
        runs, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or runs < 3:
            a @ b
            runs += 1
            if runs % 8 == 0:
                sync()
        sync()
        return 2 * m * k * n * runs / (time.perf_counter() - t0)
    finally:
        torch.set_float32_matmul_precision(before)


# ------------------------------------------------------------------ the two sides


def run_ftctl(args, model_path: Path, new: Path, old: Path | None, out: Path) -> dict:
    from ftctl.config import TrainConfig
    from ftctl.train import train

    cfg = TrainConfig(
        new_data=new,
        old_data=old,
        model_path=model_path,
        output_path=out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        replay_ratio=args.replay_ratio,
        freeze_layers=args.freeze_layers,
        seed=args.seed,
        patience=0,  # run every epoch on both sides
        device=args.device,
        precision=args.precision,
        checkpoint="none",  # as the HF side (save_strategy="no")
    )
    with FlopMeter() as meter:
        t0 = time.perf_counter()
        result = train(cfg)
        wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "val_acc": result.history[-1]["val_accuracy"],
        "train_rows": result.replay["train"],
        "flops": meter.flops,
    }


def run_hf(args, model_path: Path, new: Path, old: Path | None, out: Path) -> dict:
    with FlopMeter() as meter:
        t0 = time.perf_counter()
        acc, n_train = _hf_job(args, model_path, new, old, out)
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "val_acc": acc, "train_rows": n_train, "flops": meter.flops}


def _hf_job(args, model_path: Path, new: Path, old: Path | None, out: Path) -> tuple[float, int]:
    import numpy as np
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from ftctl import model as M
    from ftctl.data import load_examples
    from ftctl.train import mix_data

    mix = mix_data(
        load_examples(new),
        load_examples(old) if old else [],
        replay_ratio=args.replay_ratio,
        val_ratio=0.1,
        seed=args.seed,
    )  # the same split ftctl uses
    model, tok = M.load_classifier(model_path, device="cpu")
    M.freeze(model, args.freeze_layers)  # requires_grad off; Trainer puts it back in train mode
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
        output_dir=str(out),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=args.lr,
        weight_decay=0.01,
        warmup_steps=round(steps * 0.1),
        max_grad_norm=1.0,
        eval_strategy="epoch",
        save_strategy="no",
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
        compute_metrics=accuracy,
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(str(out / "final"))
    return metrics["eval_accuracy"], len(train_ds)


# ------------------------------------------------------------------ models and data


def real_shape_model() -> Path:
    """chinese-roberta-wwm-ext's shape, random weights (the deploy benchmarks' cached one)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from deploykit import build_base_size_model

    return build_base_size_model(CACHE / "base-old" / "final", seed=0)


def random_model(args) -> Path:
    """A random-weight 12-layer char BERT of hidden ``args.random_hidden`` (cached)."""
    from ftctl.data import load_examples
    from ftctl.model import build_char_tokenizer, build_classifier, cjk_vocab, save_classifier

    h = args.random_hidden
    out = CACHE / f"random-h{h}-seed{args.seed}" / "final"
    if (out / "model.safetensors").is_file():
        return out
    labels = sorted({e.label for e in load_examples(args.old_data or args.new_data)})
    vocab = cjk_vocab()
    model = build_classifier(
        labels,
        len(vocab),
        hidden_size=h,
        num_layers=12,
        num_heads=max(1, h // 64),
        intermediate_size=4 * h,
        max_position=512,
        seed=args.seed,
    )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_classifier(model, build_char_tokenizer(vocab), tmp)
    os.replace(tmp, out)
    return out


def subset(path: Path, n: int, seed: int, out: Path) -> Path:
    """``n`` rows of ``path``, stratified by intent (the same file for both sides)."""
    from ftctl.data import load_examples, write_examples
    from ftctl.train import stratified_sample

    return write_examples(out, stratified_sample(load_examples(path), n, seed))


# ------------------------------------------------------------------ main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", type=Path)
    p.add_argument(
        "--real-shape",
        action="store_true",
        help="a random-weight model of chinese-roberta-wwm-ext's shape (768x12, vocab 21128)",
    )
    p.add_argument(
        "--random-hidden",
        type=int,
        default=0,
        help="instead: a random-weight 12-layer char BERT of this hidden size; for speed "
        "only, its accuracy means nothing",
    )
    p.add_argument("--new-data", type=Path, default=Path("data/incremental_training_data.jsonl"))
    p.add_argument("--old-data", type=Path, default=Path("data/original_training_data.jsonl"))
    p.add_argument(
        "--new-rows",
        type=int,
        default=0,
        help="use this many rows of --new-data (stratified); replay adds as many old ones",
    )
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--replay-ratio", type=float, default=0.5)
    p.add_argument("--freeze-layers", type=int, default=8)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="both sides")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--hf-pad-to-max", action="store_true")
    p.add_argument("--skip-hf", action="store_true", help="time ftctl alone")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--model-only", action="store_true", help="build (or find) the model, print its path"
    )
    args = p.parse_args()

    from ftctl.quiet import silence_libraries

    silence_libraries()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

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
            from ftctl.base import BaseConfig, build_base

            model_path = build_base(
                BaseConfig(data=args.old_data, output_path=work / "base", device=args.device)
            ).final_dir
        new, old = args.new_data, args.old_data
        if args.new_rows:
            new = subset(new, args.new_rows, args.seed, work / "new.jsonl")
        rate = matmul_rate(args.device, args.precision)
        sides = {}
        if not args.skip_hf:  # HF first: any warm-up advantage goes to the baseline
            sides["hf_trainer"] = run_hf(args, model_path, new, old, work / "hf")
        sides["ftctl"] = run_ftctl(args, model_path, new, old, work / "ftctl")
        rate = max(rate, matmul_rate(args.device, args.precision))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report = summarize(args, sides, rate, torch.get_num_threads())
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)


def summarize(args, sides: dict, rate: float, threads: int) -> dict:
    out: dict = {
        "device": args.device,
        "precision": args.precision,
        "threads": threads,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "freeze_layers": args.freeze_layers,
        "matmul_gflops_per_s": round(rate / 1e9, 1),
    }
    for name, s in sides.items():
        floor = s["flops"] / rate
        out[name] = {
            "wall_s": round(s["wall_s"], 2),
            "samples_per_s": round(s["train_rows"] * args.epochs / s["wall_s"], 1),
            "val_acc": round(s["val_acc"], 4),
            "gflop": round(s["flops"] / 1e9, 1),
            "floor_s": round(floor, 2),
            "of_floor": round(floor / s["wall_s"], 3),
        }
    if "hf_trainer" in sides:
        out["speedup"] = round(sides["hf_trainer"]["wall_s"] / sides["ftctl"]["wall_s"], 2)
        out["ftctl_wall_vs_trainer"] = round(1 / out["speedup"], 2)
    return out


def print_report(r: dict) -> None:
    print(
        f"device {r['device']}, {r['precision']}, {r['threads']} threads; matmul "
        f"{r['matmul_gflops_per_s']} GFLOP/s ({GEMM[0]}x{GEMM[1]}x{GEMM[2]} GEMM)"
    )
    head = f"{'':12}{'wall s':>9}{'samples/s':>11}{'val acc':>9}{'GFLOP':>9}{'floor s':>9}"
    print(head + f"{'floor/wall':>12}")
    for name, label in (("hf_trainer", "HF Trainer"), ("ftctl", "ftctl")):
        if name in r:
            s = r[name]
            print(
                f"{label:12}{s['wall_s']:>9.2f}{s['samples_per_s']:>11.1f}{s['val_acc']:>9.4f}"
                f"{s['gflop']:>9.1f}{s['floor_s']:>9.2f}{s['of_floor']:>11.1%}"
            )
    if "speedup" in r:
        print(
            f"ftctl: {r['speedup']:.2f}x faster ({r['ftctl_wall_vs_trainer']:.2f}x Trainer's "
            "wall time)"
        )


if __name__ == "__main__":
    main()
