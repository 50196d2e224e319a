"""Speed benchmark (not a test): ftctl's train loop vs a Hugging Face Trainer on the same job.

Same base model, same data mix and validation split (ftctl.train.mix_data, same seed), same
hyperparameters (epochs, batch size, LR, linear warmup, weight decay, grad clipping) and the
same frozen layers (embeddings + first N). Prints wall time and final validation accuracy of
both, and their ratio.

    .venv/bin/python bench/bench_train.py \\
        --model-path models/chinese-roberta-wwm-ext-classifier/final \\
        --new-data data/incremental_training_data.jsonl \\
        --old-data data/original_training_data.jsonl

Without --model-path it first builds a base with `ftctl base` on --old-data (not timed).
The HF side is given dynamic per-batch padding (DataCollatorWithPadding), its strongest common
setup; pass --hf-pad-to-max to compare with padding="max_length" as many scripts do.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path


def run_ftctl(args, model_path: Path, out: Path) -> tuple[float, float]:
    from ftctl.config import TrainConfig
    from ftctl.train import train

    cfg = TrainConfig(
        new_data=args.new_data,
        old_data=args.old_data,
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
    )
    t0 = time.perf_counter()
    result = train(cfg)
    return time.perf_counter() - t0, result.history[-1]["val_accuracy"]


def run_hf(args, model_path: Path, out: Path) -> tuple[float, float]:
    import numpy as np
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from ftctl import model as M
    from ftctl.data import load_examples
    from ftctl.train import mix_data

    t0 = time.perf_counter()
    new = load_examples(args.new_data)
    old = load_examples(args.old_data) if args.old_data else []
    mix = mix_data(
        new, old, replay_ratio=args.replay_ratio, val_ratio=0.1, seed=args.seed
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
    return time.perf_counter() - t0, metrics["eval_accuracy"]


def random_model(args, out: Path) -> Path:
    from ftctl.data import load_examples
    from ftctl.model import build_char_tokenizer, build_classifier, cjk_vocab, save_classifier

    labels = sorted({e.label for e in load_examples(args.old_data or args.new_data)})
    vocab = cjk_vocab()
    h = args.random_hidden
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
    save_classifier(model, build_char_tokenizer(vocab), out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", type=Path)
    p.add_argument(
        "--random-hidden",
        type=int,
        default=0,
        help="instead: a random-weight 12-layer char BERT of this hidden size (768: the real "
        "chinese-roberta-wwm-ext config); for speed only, its accuracy means nothing",
    )
    p.add_argument("--new-data", type=Path, default=Path("data/incremental_training_data.jsonl"))
    p.add_argument("--old-data", type=Path, default=Path("data/original_training_data.jsonl"))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--replay-ratio", type=float, default=0.5)
    p.add_argument("--freeze-layers", type=int, default=8)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--hf-pad-to-max", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="ftctl-bench-"))
    try:
        model_path = args.model_path
        if args.random_hidden:
            model_path = random_model(args, work / "random" / "final")
        elif model_path is None:
            from ftctl.base import BaseConfig, build_base

            model_path = build_base(
                BaseConfig(data=args.old_data, output_path=work / "base", device=args.device)
            ).final_dir
        # HF first, then ftctl: any warm-up advantage goes to the baseline
        hf_s, hf_acc = run_hf(args, model_path, work / "hf")
        ft_s, ft_acc = run_ftctl(args, model_path, work / "ftctl")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    res = {
        "ftctl_s": round(ft_s, 2),
        "hf_trainer_s": round(hf_s, 2),
        "speedup": round(hf_s / ft_s, 2),
        "ftctl_val_acc": round(ft_acc, 4),
        "hf_val_acc": round(hf_acc, 4),
        "threads": torch.get_num_threads(),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "freeze_layers": args.freeze_layers,
    }
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{'':12}{'wall s':>10}{'val acc':>10}")
        print(f"{'HF Trainer':12}{hf_s:>10.2f}{hf_acc:>10.4f}")
        print(f"{'ftctl':12}{ft_s:>10.2f}{ft_acc:>10.4f}")
        print(f"speedup: {hf_s / ft_s:.2f}x (threads={res['threads']})")


if __name__ == "__main__":
    main()
