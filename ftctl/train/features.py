"""What the training loop eats: tokenized texts, the frozen prefix's cached output, batch plans.

``encode`` tokenizes; ``place_cache`` decides, before anything is built, where the frozen
prefix's output goes (on the GPU under a budget, else pinned CPU memory) and ``cache_prefix``
runs the embeddings + frozen layers once per text into it; ``shard_rows`` gives each process of
a distributed run its fixed share of the rows (so each one caches only its own prefixes);
``batches`` is the per-epoch plan (a function of the seed and the epoch only, so an interrupted
epoch can be replayed exactly); :class:`Staged` puts labels, lengths and inputs on the device
once and cuts each batch from them there, so a step never waits for the host.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftctl.data.examples import Example
from ftctl.errors import TrainError
from ftctl.progress import NULL, Reporter
from ftctl.train import layers

BUCKET_BATCHES = 16  # length bucketing: sort within windows of this many batches
PREFIX_BATCH = 64  # texts per forward pass when caching the frozen prefix
EVAL_BATCH = 64


@dataclass
class Features:
    """Tokenized texts + labels; ``prefix`` holds the frozen prefix's output per text when
    layers are frozen (computed once), else the input ids are embedded at every step."""

    ids: list[list[int]]
    labels: list[int]
    prefix: PrefixCache | None = None  # the frozen prefix's output, once computed

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


# ------------------------------------------------------------------ the frozen-prefix cache


PREFIX_ITEM_BYTES = 4  # the prefix's output is float32 (LayerNorm runs in fp32 under autocast)
CACHE_FREE_SHARE = 0.5  # --cache-budget auto: this share of the GPU's free memory
HOST_FREE_SHARE = 0.8  # a cache in CPU memory may take at most this share of what is available


@dataclass(frozen=True)
class CachePlan:
    """Where the frozen prefix's output is kept, decided before it is built."""

    where: str  # "device": on the GPU | "pinned": pinned CPU memory, streamed per batch | "cpu"
    nbytes: int  # what the cache takes: tokens x hidden x bytes (+ one padding row)
    texts: int
    tokens: int
    budget: int | None = None  # the GPU memory it may take (None on a CPU)
    reason: str = ""

    @property
    def on_device(self) -> bool:
        return self.where != "pinned"

    def text(self) -> str:
        size = f"{_gb(self.nbytes)} ({self.texts:,} texts, {self.tokens:,} tokens)"
        where = {
            "device": "on the GPU",
            "pinned": "in pinned CPU memory, streamed to the GPU per batch",
            "cpu": "in CPU memory",
        }[self.where]
        return f"frozen-prefix cache {size} {where}" + (f" ({self.reason})" if self.reason else "")

    def record(self) -> dict[str, Any]:
        return {"where": self.where, "bytes": self.nbytes, "texts": self.texts,
                "tokens": self.tokens, "budget": self.budget}  # fmt: skip


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def cache_bytes(tokens: int, hidden: int) -> int:
    """Bytes of a cache of ``tokens`` token rows (+ the padding row) of width ``hidden``."""
    return (tokens + 1) * hidden * PREFIX_ITEM_BYTES


def place_cache(
    texts: int,
    tokens: int,
    hidden: int,
    *,
    cuda: bool,
    budget: int | None,
    gpu_free: int | None,
    host_free: int | None,
) -> CachePlan:
    """Where a cache of ``tokens`` token rows goes (a pure decision: the free memory is given).

    On a GPU it stays on the device when it fits ``budget`` bytes (None: CACHE_FREE_SHARE of
    ``gpu_free``), else it goes to pinned CPU memory and each batch is streamed to the GPU. In
    CPU memory (either way) it may take at most HOST_FREE_SHARE of ``host_free``: more is a
    TrainError before anything is built."""
    nbytes = cache_bytes(tokens, hidden)
    plan = CachePlan("cpu", nbytes, texts, tokens)
    if cuda:
        auto = budget is None
        limit = int((gpu_free or 0) * CACHE_FREE_SHARE) if auto else budget
        named = (
            f"half of the GPU's {_gb(gpu_free or 0)} free" if auto else "--cache-budget"
        ) + f": {_gb(limit)}"
        if nbytes <= limit:
            return CachePlan("device", nbytes, texts, tokens, limit, f"budget {named}")
        plan = CachePlan("pinned", nbytes, texts, tokens, limit, f"over the budget, {named}")
    if host_free is not None and nbytes > host_free * HOST_FREE_SHARE:
        raise TrainError(
            f"the frozen-prefix cache needs {_gb(nbytes)} ({texts:,} texts, {tokens:,} tokens x "
            f"{hidden} x {PREFIX_ITEM_BYTES} B) and only {_gb(host_free)} of CPU memory is "
            "available",
            hint="train on fewer rows or with a smaller --max-length, or free memory"
            + (" (or give the GPU cache a larger --cache-budget)" if cuda else ""),
        )
    return plan


def gpu_free_memory(device: str) -> int | None:
    """Free bytes on the CUDA ``device`` now (None on a CPU)."""
    if not str(device).startswith("cuda"):
        return None
    import torch

    return int(torch.cuda.mem_get_info(torch.device(device))[0])


def host_free_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass
class PrefixCache:
    """The frozen prefix's output of every text, one row per token: text ``i`` is rows
    ``offsets[i] : offsets[i] + len(ids[i])`` of ``store`` ([tokens + 1, H]); the last row is
    zeros (what a padded position reads). ``store`` is on the training device, or in (pinned)
    CPU memory when ``plan.where == "pinned"``."""

    store: Any
    offsets: list[int]
    plan: CachePlan


def cache_prefix(
    model,
    feats: Features,
    n_frozen: int,
    device,
    reporter: Reporter = NULL,
    what: str = "texts",
    *,
    plan: CachePlan | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    check: Callable[[], None] = lambda: None,
) -> None:
    """Run embeddings + the frozen layers once per text (grouped by exact length: no padding)
    into ``feats.prefix``, kept where ``plan`` says (default: on ``device``). ``check`` is
    called between chunks (it raises to abandon the work)."""
    import torch

    hidden = int(model.config.hidden_size)
    tokens = sum(len(r) for r in feats.ids)
    plan = plan or CachePlan("device", cache_bytes(tokens, hidden), len(feats), tokens)
    home = "cpu" if plan.where == "pinned" else device
    pinned = plan.where == "pinned" and str(device).startswith("cuda")
    store = torch.empty((tokens + 1, hidden), dtype=torch.float32, device=home, pin_memory=pinned)
    store[tokens].zero_()
    offsets = [0] * len(feats)
    by_len: dict[int, list[int]] = {}
    for i, row in enumerate(feats.ids):
        by_len.setdefault(len(row), []).append(i)
    at = 0
    with (
        torch.no_grad(),
        reporter.task(f"frozen layers, {what}", total=len(feats), unit="text") as advance,
    ):
        for length, idx in sorted(by_len.items()):
            for s in range(0, len(idx), PREFIX_BATCH):
                check()
                chunk = idx[s : s + PREFIX_BATCH]
                ids = torch.tensor([feats.ids[i] for i in chunk], device=device)
                with autocast():
                    out = layers.prefix_forward(model, ids, n_frozen)
                store[at : at + len(chunk) * length].copy_(out.reshape(-1, hidden))
                for j, i in enumerate(chunk):
                    offsets[i] = at + j * length
                at += len(chunk) * length
                advance(len(chunk))
    feats.prefix = PrefixCache(store, offsets, plan)


# ------------------------------------------------------------------ batches on the device


def to_device(tensor, device):
    """``tensor`` (CPU) on ``device`` without making the host wait: staged through pinned
    memory and copied with ``non_blocking=True`` on CUDA (a pageable or blocking copy waits
    for every queued kernel); unchanged on a CPU."""
    if not str(device).startswith("cuda"):
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


class Staged:
    """``feats`` made ready for ``device`` once: the labels, the lengths, the row offsets and
    the token ids (or the prefix cache) live on the device, so a batch is cut from them with
    device-side indexing only. Per epoch, one pinned copy brings the epoch's row order
    (:meth:`order`); per batch, nothing crosses from the host but a prefix cache kept in
    pinned CPU memory (gathered there, copied with ``non_blocking``)."""

    def __init__(self, feats: Features, device) -> None:
        import torch

        self.feats, self.device = feats, device
        self.lengths = [len(r) for r in feats.ids]
        cache = feats.prefix
        if cache is None:
            offsets, at = [], 0
            for n in self.lengths:
                offsets.append(at)
                at += n
            flat = [t for row in feats.ids for t in row] + [0]  # + the padding row: [PAD] = 0
            self.store = to_device(torch.tensor(flat, dtype=torch.long), device)
            self.streamed = False
        else:
            offsets, self.store = cache.offsets, cache.store
            self.streamed = not cache.plan.on_device
        self.pad_row = sum(self.lengths)
        self.host_offsets = torch.tensor(offsets, dtype=torch.long)
        self.host_lengths = torch.tensor(self.lengths, dtype=torch.long)
        self.offsets = to_device(self.host_offsets, device)
        self.lengths_t = to_device(self.host_lengths, device)
        self.labels = to_device(torch.tensor(feats.labels, dtype=torch.long), device)

    def order(self, plan: list[list[int]]):
        """The rows of ``plan``'s batches, in order, on the device (one copy); batch ``k`` is
        ``rows[starts[k]:starts[k + 1]]``. Returns (rows on the device, rows on the host)."""
        import torch

        flat = torch.tensor([i for b in plan for i in b], dtype=torch.long)
        return to_device(flat, self.device), flat

    def batch(self, rows, host_rows, width: int):
        """(inputs, attention mask, targets) of the rows ``rows`` (a device slice of
        :meth:`order`; ``host_rows`` the same on the host), padded to ``width`` tokens.
        ``inputs``: the cached prefix output [B, L, H], else the token ids [B, L]."""
        import torch

        span = torch.arange(width, device=self.device)
        mask = span[None, :] < self.lengths_t[rows][:, None]
        target = self.labels[rows]
        if self.streamed:
            inputs = self._streamed(host_rows, width)
        else:
            where = self.offsets[rows][:, None] + span[None, :]
            inputs = self.store[torch.where(mask, where, self.pad_row)]
        return inputs, mask.long(), target

    def _streamed(self, host_rows, width: int):
        """The prefix rows of a batch gathered from pinned CPU memory and copied to the
        device without waiting (the host gathers the next batch meanwhile)."""
        import torch

        span = torch.arange(width)
        mask = span[None, :] < self.host_lengths[host_rows][:, None]
        start = self.host_offsets[host_rows][:, None]
        where = torch.where(mask, start + span[None, :], self.pad_row)
        hidden = self.store.shape[1]
        cuda = str(self.device).startswith("cuda")
        out = torch.empty((where.numel(), hidden), dtype=self.store.dtype, pin_memory=cuda)
        torch.index_select(self.store, 0, where.view(-1), out=out)
        return out.view(len(host_rows), width, hidden).to(self.device, non_blocking=True)

    def width(self, rows: list[int]) -> int:
        """The longest text of ``rows`` (known on the host: no device read)."""
        return max(self.lengths[i] for i in rows)


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
                inputs = layers.prefix_forward(net, inputs, 0)
            return layers.head_forward(net, inputs, mask, self.n_frozen, cls_only=True)

    return TrainableTop


def _trainable_modules(model, n_frozen: int) -> list:
    """The modules holding every trainable parameter of ``model`` (after freeze)."""
    import torch

    if n_frozen == 0:
        return [model]
    base = layers.base_module(model)
    parts = [*base.encoder.layer[n_frozen:], model.classifier]
    if getattr(base, "pooler", None) is not None:
        parts.append(base.pooler)
    if isinstance(getattr(model, "dropout", None), torch.nn.Module):
        parts.append(model.dropout)  # no parameters, but its train/eval mode matters
    covered = {id(p) for m in parts for p in m.parameters()}
    if any(p.requires_grad and id(p) not in covered for p in model.parameters()):
        return [model]  # an unusual layout: train through the whole model
    return parts


def evaluate_sums(top, staged: Staged, autocast=contextlib.nullcontext):
    """(summed loss, correct, count) over ``staged``'s rows in eval mode, as device tensors
    (summable across processes before they are read)."""
    import torch
    import torch.nn.functional as F

    device = staged.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    plan = batches(staged.feats, EVAL_BATCH, None)
    rows, host_rows = staged.order(plan)
    was_training = top.training
    top.eval()
    with torch.no_grad():
        at = 0
        for idx in plan:
            end = at + len(idx)
            inputs, mask, target = staged.batch(rows[at:end], host_rows[at:end], staged.width(idx))
            at = end
            with autocast():
                logits = top(inputs, mask).float()
            loss_sum += F.cross_entropy(logits, target, reduction="sum").double()
            correct += (logits.argmax(-1) == target).sum()
    top.train(was_training)
    return loss_sum, correct, len(staged.feats)
