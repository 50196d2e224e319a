"""What the training loop eats: tokenized texts, the frozen prefix's cached output, batch plans.

``encode`` tokenizes; ``cache_prefix`` runs the embeddings + frozen layers once per text;
``shard_rows`` gives each process of a distributed run its fixed share of the rows (so each one
caches only its own prefixes); ``batches`` is the per-epoch plan (a function of the seed and the
epoch only, so an interrupted epoch can be replayed exactly); ``collate`` pads one batch.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ftctl import model as M
from ftctl.data import Example
from ftctl.progress import NULL, Reporter

BUCKET_BATCHES = 16  # length bucketing: sort within windows of this many batches
PREFIX_BATCH = 64  # texts per forward pass when caching the frozen prefix
EVAL_BATCH = 64


@dataclass
class Features:
    """Tokenized texts + labels; ``prefix`` holds the frozen prefix's output per text when
    layers are frozen (computed once), else the input ids are embedded at every step."""

    ids: list[list[int]]
    labels: list[int]
    prefix: list[Any] | None = None  # [L_i, H] tensors on the training device

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, rows: Sequence[int]) -> Features:
        """These rows (repeats allowed), without a prefix cache."""
        return Features([self.ids[i] for i in rows], [self.labels[i] for i in rows])


def encode(tokenizer, examples: Sequence[Example], label2id: dict[str, int], max_length: int):
    if not examples:
        return Features([], [])
    enc = tokenizer([ex.text for ex in examples], truncation=True, max_length=max_length)
    return Features(list(enc["input_ids"]), [label2id[ex.label] for ex in examples])


def informative(tokenizer, examples: Sequence[Example]) -> tuple[list[Example], list[Example]]:
    """(kept, dropped): texts that tokenize to nothing but [UNK] carry no signal."""
    if not examples:
        return [], []
    unk = tokenizer.unk_token_id
    special = set(tokenizer.all_special_ids) - {unk}
    kept, dropped = [], []
    ids = tokenizer([ex.text for ex in examples], add_special_tokens=False)["input_ids"]
    for ex, row in zip(examples, ids, strict=True):
        useful = [i for i in row if i != unk and i not in special]
        (kept if useful else dropped).append(ex)
    return kept, dropped


def shard_rows(lengths: Sequence[int], rank: int, world: int, *, pad: bool) -> list[int]:
    """Row indices of process ``rank`` of ``world``: rows sorted by length and dealt in turn
    (every process gets the same mix of lengths, so none waits for the others), the same rows
    in every epoch (each process caches the prefix of its own rows only). With ``pad`` every
    share is topped up to the largest one by repeating its first rows (as torch's
    DistributedSampler does), so every process runs the same number of steps."""
    n = len(lengths)
    if world == 1:
        return list(range(n))
    order = sorted(range(n), key=lambda i: (lengths[i], i))
    mine = order[rank::world]
    if pad and mine:
        size = math.ceil(n / world)
        mine += [mine[k % len(mine)] for k in range(size - len(mine))]
    return mine


def shard(feats: Features, rank: int, world: int, *, pad: bool) -> Features:
    """Process ``rank``'s share of ``feats`` (see :func:`shard_rows`); all of it for one."""
    if world == 1:
        return feats
    return feats.subset(shard_rows([len(r) for r in feats.ids], rank, world, pad=pad))


def cache_prefix(
    model,
    feats: Features,
    n_frozen: int,
    device,
    reporter: Reporter = NULL,
    what: str = "texts",
    *,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    check: Callable[[], None] = lambda: None,
) -> None:
    """Run embeddings + the frozen layers once per text (grouped by exact length: no padding).
    ``check`` is called between chunks (it raises to abandon the work)."""
    import torch

    by_len: dict[int, list[int]] = {}
    for i, row in enumerate(feats.ids):
        by_len.setdefault(len(row), []).append(i)
    out: list[Any] = [None] * len(feats)
    with (
        torch.no_grad(),
        reporter.task(f"frozen layers, {what}", total=len(feats), unit="text") as advance,
    ):
        for _length, idx in sorted(by_len.items()):
            for s in range(0, len(idx), PREFIX_BATCH):
                check()
                chunk = idx[s : s + PREFIX_BATCH]
                ids = torch.tensor([feats.ids[i] for i in chunk], device=device)
                with autocast():
                    hidden = M.prefix_forward(model, ids, n_frozen)
                for j, i in enumerate(chunk):
                    out[i] = hidden[j]
                advance(len(chunk))
    feats.prefix = out


def batches(feats: Features, batch_size: int, seed: int | None) -> list[list[int]]:
    """Index batches. Training (seed given): shuffled, then sorted by length within windows of
    BUCKET_BATCHES batches, batch order shuffled. Eval (seed None): sorted by length.
    The batch sizes depend only on ``len(feats)``, ``batch_size`` and ``seed``, so processes
    with equally large shards and the same seed run equally large batches at every step."""
    import torch

    n = len(feats)
    if seed is None:
        order = sorted(range(n), key=lambda i: len(feats.ids[i]))
        return [order[s : s + batch_size] for s in range(0, n, batch_size)]
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen).tolist()
    window = batch_size * BUCKET_BATCHES
    out: list[list[int]] = []
    for w in range(0, n, window):
        chunk = sorted(perm[w : w + window], key=lambda i: len(feats.ids[i]))
        out += [chunk[s : s + batch_size] for s in range(0, len(chunk), batch_size)]
    shuffled = torch.randperm(len(out), generator=gen).tolist()
    return [out[i] for i in shuffled]


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s batch plan (the plan is a function of these two only)."""
    return seed * 1000 + epoch


def collate(feats: Features, idx: list[int], device):
    """(inputs, attention mask, targets) of one batch, padded to its longest text. ``inputs``
    is the cached prefix output [B, L, H] when there is one, else the token ids [B, L]."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    lengths = torch.tensor([len(feats.ids[i]) for i in idx])
    mask = (torch.arange(int(lengths.max()))[None, :] < lengths[:, None]).long().to(device)
    target = torch.tensor([feats.labels[i] for i in idx], device=device)
    if feats.prefix is not None:
        inputs = pad_sequence([feats.prefix[i] for i in idx], batch_first=True)
    else:
        rows = [torch.tensor(feats.ids[i]) for i in idx]
        inputs = pad_sequence(rows, batch_first=True).to(device)
    return inputs, mask, target


def trainable_top(model, n_frozen: int):
    """The module that trains: layers [n_frozen:] + pooler + head (the whole model when nothing
    is frozen); ``top(inputs, mask)`` gives the logits of a collated batch. DDP wraps this
    module, so only the trainable parameters are synchronised; ``top.train()`` leaves the frozen
    prefix in eval mode (no dropout there)."""
    return _top_class()(model, n_frozen)


@functools.cache
def _top_class():
    import torch

    class TrainableTop(torch.nn.Module):
        def __init__(self, model, n_frozen: int) -> None:
            super().__init__()
            self.n_frozen = n_frozen
            self.parts = torch.nn.ModuleList(_trainable_modules(model, n_frozen))
            object.__setattr__(self, "classifier_model", model)  # not a registered child

        def forward(self, inputs, mask):
            net = self.classifier_model
            if self.n_frozen == 0:
                inputs = M.prefix_forward(net, inputs, 0)
            return M.head_forward(net, inputs, mask, self.n_frozen, cls_only=True)

    return TrainableTop


def _trainable_modules(model, n_frozen: int) -> list:
    """The modules holding every trainable parameter of ``model`` (after freeze)."""
    import torch

    if n_frozen == 0:
        return [model]
    base = M.base_module(model)
    parts = [*base.encoder.layer[n_frozen:], model.classifier]
    if getattr(base, "pooler", None) is not None:
        parts.append(base.pooler)
    if isinstance(getattr(model, "dropout", None), torch.nn.Module):
        parts.append(model.dropout)  # no parameters, but its train/eval mode matters
    covered = {id(p) for m in parts for p in m.parameters()}
    if any(p.requires_grad and id(p) not in covered for p in model.parameters()):
        return [model]  # an unusual layout: train through the whole model
    return parts


def evaluate_sums(top, feats: Features, device, autocast=contextlib.nullcontext):
    """(summed loss, correct, count) over ``feats`` in eval mode, as device tensors (summable
    across processes before they are read)."""
    import torch
    import torch.nn.functional as F

    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    was_training = top.training
    top.eval()
    with torch.no_grad():
        for idx in batches(feats, EVAL_BATCH, None):
            inputs, mask, target = collate(feats, idx, device)
            with autocast():
                logits = top(inputs, mask).float()
            loss_sum += F.cross_entropy(logits, target, reduction="sum").double()
            correct += (logits.argmax(-1) == target).sum()
    top.train(was_training)
    return loss_sum, correct, len(feats)


def evaluate(model, feats: Features, n_frozen: int, device) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` on ``feats`` (prefix cached when ``n_frozen``)."""
    if not len(feats):
        return float("nan"), float("nan")
    loss_sum, correct, n = evaluate_sums(trainable_top(model, n_frozen), feats, device)
    return float(loss_sum) / n, int(correct) / n
