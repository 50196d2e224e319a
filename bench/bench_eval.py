"""Throughput of ftctl's batched predict() vs transformers.pipeline("text-classification").

Same model, same cases, same device. The model is a random-weight char-level BERT with the
real base model's depth (12 layers) and the hidden size you choose (weights do not matter for
speed); the cases are drawn from data/test_cases.jsonl like `ftctl eval` does.

    .venv/bin/python bench/bench_eval.py                      # hidden 256, 500 cases, CPU
    .venv/bin/python bench/bench_eval.py --hidden 768 --device cuda

Prints cases/s for each way and the ratios; exits 1 if the labels disagree.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ftctl.quiet import silence_libraries

silence_libraries()

ROOT = Path(__file__).resolve().parent.parent


def build(hidden: int, layers: int, labels: list[str]):
    from ftctl.train.base import build_char_tokenizer, build_classifier, cjk_vocab

    vocab = cjk_vocab()
    tok = build_char_tokenizer(vocab)
    model = build_classifier(
        labels,
        len(vocab),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=max(1, hidden // 64),
        intermediate_size=hidden * 4,
        max_position=512,
    )
    return model.eval(), tok


def timed(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--test-data", type=Path, default=ROOT / "data/test_cases.jsonl")
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=2, help="best of N timed runs")
    args = ap.parse_args()

    import torch
    from transformers import pipeline

    from ftctl.data.examples import load_examples
    from ftctl.eval.cases import draw_cases
    from ftctl.model.inference import predict

    examples = load_examples(args.test_data, what="test")
    cases = draw_cases(examples, args.samples, args.seed).cases
    texts = [c.text for c in cases]
    labels = sorted({c.label for c in cases})
    model, tok = build(args.hidden, args.layers, labels)
    model.to(args.device)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"model: BERT hidden {args.hidden}, {args.layers} layers, {params:.1f}M params; "
        f"{len(texts)} cases from {args.test_data.name}; device {args.device}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    predict(model, tok, texts[:32], args.batch_size, 64, args.device)  # warm-up
    t_ours, (ours, _) = timed(
        lambda: predict(model, tok, texts, args.batch_size, 64, args.device), args.repeat
    )
    clf = pipeline("text-classification", model=model, tokenizer=tok, device=args.device)
    clf(texts[:8])  # warm-up
    rows = [("ftctl predict", t_ours, ours)]
    for batch in (1, args.batch_size):
        t, out = timed(lambda b=batch: clf(texts, batch_size=b, truncation=True, max_length=64), 1)
        rows.append((f"pipeline batch_size={batch}", t, [o["label"] for o in out]))

    print(f"{'way':28} {'seconds':>8} {'cases/s':>9} {'ftctl is':>9}")
    for name, t, _ in rows:
        print(f"{name:28} {t:8.2f} {len(texts) / t:9.0f} {t / t_ours:8.1f}x")
    agree = all(out == ours for _, _, out in rows)
    print(f"labels agree: {agree}")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
