"""Real tiny models and test pools for the eval tests (test_eval.py, test_gate.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.helpers import INTENTS

# one distinctive word per intent (shared/INTENTS.md) and sentence shapes around it
KEYWORDS = (
    "在产批次",
    "原料批次",
    "打卡",
    "出勤",
    "发货统计",
    "签退",
    "新建发货",
    "库存",
    "质检",
    "设备",
    "生产计划",
    "订单",
    "请假",
    "供应商",
    "溯源",
    "告警",
    "冷库温度",
    "日报",
    "入库",
    "排班",
)
SHAPES = (
    "{}",
    "查{}",
    "看看{}",
    "帮我{}",
    "我要{}",
    "{}呢",
    "麻烦{}一下",
    "请问{}",
    "{}怎么样",
    "现在{}",
    "今天的{}",
    "{}情况",
)


def pool_rows(per_intent: int = len(SHAPES), *, ids: bool = True) -> list[dict]:
    """``per_intent`` cases per intent, ids ``<INTENT>-<k>``."""
    rows = []
    for lab, kw in zip(INTENTS, KEYWORDS, strict=True):
        for k, shape in enumerate(SHAPES[:per_intent]):
            row = {"text": shape.format(kw), "label": lab}
            rows.append({"id": f"{lab}-{k}", **row} if ids else row)
    return rows


def write_pool(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def train_tiny(
    out_dir: Path,
    rows: list[dict],
    tokenizer_dir: Path,
    *,
    steps: int = 60,
    lr: float = 5e-3,
    seed: int = 0,
) -> Path:
    """A tiny char-level BERT (2 layers) trained until it knows the pool: a real 'good'
    baseline. Reuses the tokenizer saved in ``tokenizer_dir`` (building one is slow)."""
    import torch

    from ftctl.model.files import load_tokenizer, save_classifier
    from ftctl.train.base import build_classifier

    tok = load_tokenizer(tokenizer_dir)
    model = build_classifier(
        list(INTENTS), len(tok), hidden_size=64, num_layers=2, num_heads=2,
        intermediate_size=128, seed=seed,
    )  # fmt: skip
    label2id = model.config.label2id
    enc = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
    y = torch.tensor([label2id[r["label"]] for r in rows])
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randperm(len(rows), generator=gen)[:64]
        loss = model(**{k: v[idx] for k, v in enc.items()}, labels=y[idx]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    save_classifier(model, tok, out_dir)
    return out_dir


def edit_head(src: Path, dst: Path, *, forget: str, into: str | None = None) -> Path:
    """Copy a model dir and make it forget intent ``forget`` (its bias -> -1e4); with ``into``,
    its cases go to ``into`` instead (``into`` takes over ``forget``'s head row)."""
    from ftctl.model.files import load_classifier, save_classifier

    shutil.copytree(src, dst)
    model, tok = load_classifier(dst)
    ids = model.config.label2id
    w, b = model.classifier.weight.data, model.classifier.bias.data
    if into is not None:
        w[ids[into]] = w[ids[forget]]
        b[ids[into]] = b[ids[forget]] + 1.0
    b[ids[forget]] = -1e4
    save_classifier(model, tok, dst)
    return dst
