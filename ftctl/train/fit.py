"""The training loop, read top to bottom: ``fit`` trains the unfrozen top of a classifier.

1. optimizer (AdamW, no decay on biases and LayerNorm) and linear warmup/decay schedule;
2. the starting point: fresh (the base model scored on the validation split as epoch 0) or
   the checkpoint of an earlier run (``--resume``), possibly in the middle of an epoch;
3. per epoch: the batch plan (a function of the seed and the epoch), the steps, an evaluation,
   the early-stopping decision (made once, on rank 0, for every process), metrics.jsonl and
   the checkpoint; a stop request (SIGINT/SIGTERM) is honoured between two steps: the
   checkpoint is written there and :class:`Interrupted` raised;
4. the best weights (epoch 0, the base, included) are left loaded.

No host sync per step: labels, lengths and inputs are on the device before the epoch starts
(:class:`ftctl.train.features.Staged`), the batch widths are known on the host, and the running loss
is summed on the device and read at most once a second (for the progress line) and at the end
of an epoch. ``--grad-accum N`` sums the gradients of N micro-batches of ``--batch-size`` rows
per optimizer step: the steps, the schedule and the loss (a mean over the step's rows) are
those of one batch of N x batch-size rows. A stop request lands between two optimizer steps,
never inside an accumulation. CUDA out-of-memory becomes :class:`ftctl.errors.OutOfMemory`,
naming the step and the batch size.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftctl.config import TrainConfig
from ftctl.fsutil import atomic_write_text
from ftctl.progress import NULL, Reporter
from ftctl.terms import seed_term
from ftctl.train import checkpoint as ckpt
from ftctl.train.distributed import SINGLE, World, wrap_ddp
from ftctl.train.features import Features, Staged, batches, epoch_seed, evaluate_sums, trainable_top
from ftctl.train.numerics import FP32, Precision, explain_oom

METRICS = "metrics.jsonl"
MAX_GRAD_NORM = 1.0  # as the HF Trainer default
LOSS_EVERY_S = 1.0  # the running loss is read from the device at most this often
STOP_SYNC_EVERY = 8  # steps between the processes' "does any of us have to stop?" exchange

EpochHook = Callable[[dict[str, Any]], None]


# ============================================================================ setup + results


class Interrupted(KeyboardInterrupt):
    """Training stopped on request after a whole step. ``checkpoint``: the file ``--resume``
    continues from (None: nothing was kept)."""

    def __init__(self, checkpoint: Path | None, epoch: int = 0, batch: int = 0) -> None:
        super().__init__("interrupted")
        self.checkpoint = checkpoint
        self.epoch = epoch  # epochs complete
        self.batch = batch  # batches done of the next epoch


@dataclass
class Setup:
    """Where and how the loop runs: everything that is not a hyperparameter."""

    device: str
    out_dir: Path
    world: World = SINGLE
    precision: Precision = FP32
    fingerprint: str = ""  # a checkpoint is only resumed by a run with the same one
    resume: bool = False
    checkpoints: bool = True  # --checkpoint epoch (True) | none
    reporter: Reporter = NULL
    on_epoch_end: EpochHook | None = None
    stop: Callable[[], bool] | None = None  # polled between steps: True asks to stop

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoints" / ckpt.CHECKPOINT

    def kept_checkpoint(self) -> Path | None:
        path = self.checkpoint_path
        return path if self.checkpoints and path.is_file() else None

    def check_stop(self) -> None:
        """Between two pieces of preparatory work: stop now if asked (a checkpoint an earlier
        run left is kept)."""
        if self.stop is not None and self.stop():
            raise Interrupted(self.kept_checkpoint())


@dataclass
class FitResult:
    history: list[dict[str, Any]]  # epoch 0 (the starting model) first
    best_epoch: int
    best: dict[str, Any]
    stopped_early: bool
    resumed_from_epoch: int | None
    resumed_at_batch: int
    steps: int
    plan: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Progress:
    """Where the loop stands; what a checkpoint saves."""

    epoch: int = 0  # epochs complete
    batch: int = 0  # batches done of epoch + 1
    step: int = 0  # optimizer steps so far
    loss_sum: float = 0.0  # this process's summed training loss of the batches done of epoch + 1
    seen: int = 0  # its rows
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    best_weights: dict[str, Any] = field(default_factory=dict)
    bad_evals: int = 0


@dataclass
class _Parts:
    """What the steps work on: the model, its trainable top (``net``: the same, in DDP when
    there are several processes), the optimizer and the schedule."""

    model: Any
    top: Any
    net: Any
    optimizer: Any
    scheduler: Any
    train: Any = None  # the training rows, Staged on the device
    val: Any = None  # the validation rows, Staged on the device


def early_stop(patience: int, bad_evals: int, epoch: int, epochs: int) -> bool:
    """Stop after ``patience`` evaluations without improvement (0: never), unless it is the
    last epoch anyway."""
    return patience > 0 and bad_evals >= patience and epoch < epochs


def plan(
    cfg: TrainConfig, n_train: int, n_val: int, world: World, cache: str | None = None
) -> dict[str, Any]:
    """What the loop will do, with a sentence for the user (``plan["text"]``). ``n_train``:
    training rows per process; ``cache``: where the frozen prefix's output is kept, and how big."""
    rows = cfg.batch_size * cfg.grad_accum  # one optimizer step, per process
    steps = math.ceil(n_train / rows)
    per_step = rows * world.size
    can_stop = 0 < cfg.patience < cfg.epochs
    if cfg.patience == 0:
        stopping = "no early stopping (--patience 0)"
    elif can_stop:
        stopping = (
            f"early stopping after {cfg.patience} epoch(s) without improvement on the best so "
            "far (epoch 0 = the base model)"
        )
    else:
        stopping = (
            f"early stopping cannot fire: --patience {cfg.patience} needs more than "
            f"{cfg.patience} epochs and there are {cfg.epochs} (the best epoch, the base model "
            "included, is still the one kept)"
        )
    procs = f" x {world.size} processes" if world.size > 1 else ""
    accum = ""
    if cfg.grad_accum > 1:
        accum = f" ({cfg.grad_accum} accumulated batches of {cfg.batch_size})"
    text = (
        f"plan: {cfg.epochs} epoch(s) of {steps} steps, {rows} rows per step{accum}"
        f"{procs} ({per_step} in all); {n_val} validation rows scored before training "
        f"(epoch 0) and after every epoch; {stopping}" + (f"; {cache}" if cache else "")
    )
    return {
        "epochs": cfg.epochs,
        "steps_per_epoch": steps,
        "rows_per_step": per_step,
        "grad_accum": cfg.grad_accum,
        "processes": world.size,
        "patience": cfg.patience,
        "early_stopping_possible": can_stop,
        "text": text,
    }


# ============================================================================ the loop


def fit(
    model,
    train_feats: Features,
    val_feats: Features,
    cfg: TrainConfig,
    *,
    n_frozen: int,
    setup: Setup,
) -> FitResult:
    """Train the unfrozen part of ``model`` on ``train_feats`` (this process's share); score
    ``val_feats`` (its share) before training and after every epoch (OUT/metrics.jsonl);
    checkpoint every epoch (OUT/checkpoints/, unless ``setup.checkpoints`` is off); stop early
    after ``cfg.patience`` epochs without improvement (0: never); leave the best weights
    loaded. Best = highest val accuracy, ties broken by lower val loss; the base model (epoch
    0) competes too."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    world, rep = setup.world, setup.reporter
    top = trainable_top(model, n_frozen)
    optimizer = _optimizer(top, cfg)
    cache = train_feats.prefix.plan if train_feats.prefix is not None else None
    n_val = int(world.sum([len(val_feats)])[0])
    the_plan = plan(cfg, len(train_feats), n_val, world, cache.text() if cache else None)
    if cache is not None:
        the_plan["cache"] = cache.record()
    total_steps = the_plan["steps_per_epoch"] * cfg.epochs
    scheduler = get_linear_schedule_with_warmup(
        optimizer, round(total_steps * cfg.warmup_ratio), total_steps
    )
    rep.info(the_plan["text"])
    parts = _Parts(model, top, wrap_ddp(top, world, setup.device), optimizer, scheduler)
    parts.train = Staged(train_feats, setup.device)
    parts.val = Staged(val_feats, setup.device)

    torch.manual_seed(cfg.seed + world.rank)  # dropout differs between processes
    t0 = time.perf_counter()
    prog = _resume(parts, setup)
    resumed = (prog.epoch, prog.batch) if prog is not None else None
    if prog is None:
        prog = _fresh(parts, setup)

    stopped = early_stop(cfg.patience, prog.bad_evals, prog.epoch, cfg.epochs)
    for epoch in range(prog.epoch + 1, cfg.epochs + 1):
        if stopped:
            break
        loss_sum, seen = _train_epoch(parts, cfg, epoch, prog, setup)
        stopped = _end_epoch(parts, cfg, prog, setup, loss_sum, seen, t0)
        if stopped:
            rep.info(f"{seed_term('early stopping')}: no improvement for {prog.bad_evals} epoch(s)")

    ckpt.load_trainable(model, prog.best_weights)
    return FitResult(
        history=prog.history,
        best_epoch=prog.best["epoch"],
        best=prog.best,
        stopped_early=stopped,
        resumed_from_epoch=resumed[0] if resumed else None,
        resumed_at_batch=resumed[1] if resumed else 0,
        steps=prog.step,
        plan=the_plan,
    )


def _optimizer(top, cfg: TrainConfig):
    import torch

    decay, no_decay = [], []
    for name, p in top.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        fused=True,  # one kernel for all parameters: ~1/3 faster on CPU, deterministic
    )


def _evaluate(parts: _Parts, setup: Setup) -> tuple[float, float]:
    """(mean loss, accuracy) over every process's validation share."""
    with explain_oom("scoring the validation split", None, None):
        loss_sum, correct, n = evaluate_sums(parts.top, parts.val, setup.precision.autocast)
    loss_sum, correct, n = setup.world.sum([float(loss_sum), int(correct), n])
    if not n:
        return float("nan"), float("nan")
    return loss_sum / n, correct / n


def _fresh(parts: _Parts, setup: Setup) -> _Progress:
    """The starting point of a new run: the base model scored as epoch 0, and the best so far."""
    val_loss, val_acc = _evaluate(parts, setup)
    record = {
        "epoch": 0,
        "step": 0,
        "train_loss": None,
        "val_loss": val_loss,
        "val_accuracy": val_acc,
        "lr": None,
        "improved": None,
        "elapsed_s": 0.0,
    }
    setup.reporter.info(f"epoch 0 (the base model): val_loss {val_loss:.4f}  val_acc {val_acc:.4f}")
    prog = _Progress(
        history=[record],
        best={"epoch": 0, "val_accuracy": val_acc, "val_loss": val_loss},
        best_weights=ckpt.trainable_state(parts.model),
    )
    _write_metrics(prog, setup)
    return prog


def _resume(parts: _Parts, setup: Setup) -> _Progress | None:
    """The progress saved by an earlier run (rank 0 reads it, every process gets it), or None."""
    if not setup.resume:
        return None
    path = setup.checkpoint_path
    state = None
    if setup.world.is_main and path.is_file():
        state = ckpt.load(path, setup.fingerprint)
    state = setup.world.broadcast(state)
    if state is None:
        setup.reporter.warn(f"--resume: no checkpoint at {path}; starting from the beginning")
        return None
    ckpt.load_trainable(parts.model, state["trainable"])
    parts.optimizer.load_state_dict(state["optimizer"])  # moved onto the parameters' device
    parts.scheduler.load_state_dict(state["scheduler"])
    ckpt.set_rng_state(state["rng"][setup.world.rank], setup.device)
    where = f"epoch {state['epoch']}" + (
        f", {state['batch']} batches into epoch {state['epoch'] + 1}" if state["batch"] else ""
    )
    setup.reporter.info(f"resuming after {where} (step {state['step']})")
    best_weights = state["best_weights"]
    mine = state["sums"][setup.world.rank]  # this process's own running loss
    return _Progress(
        epoch=state["epoch"],
        batch=state["batch"],
        step=state["step"],
        loss_sum=mine["loss_sum"],
        seen=mine["seen"],
        history=state["history"],
        best=state["best"],
        best_weights=best_weights if best_weights is not None else state["trainable"],
        bad_evals=state["bad_evals"],
    )


def _stop_requested(setup: Setup, k: int) -> bool:
    """Does any process have to stop before step ``k``? (Asked of every process only every
    STOP_SYNC_EVERY steps, at the same steps everywhere.)"""
    if setup.stop is None:
        return False
    if setup.world.size == 1:
        return setup.stop()
    return k % STOP_SYNC_EVERY == 0 and setup.world.any(setup.stop())


def _train_epoch(parts: _Parts, cfg, epoch, prog, setup):
    """One epoch's optimizer steps (from ``prog.batch`` on, when resumed mid-epoch), each over
    ``cfg.grad_accum`` micro-batches; returns the summed loss (a device tensor) and the rows
    seen."""
    import torch

    staged, device = parts.train, setup.device
    groups = batches(staged.feats, cfg.batch_size * cfg.grad_accum, epoch_seed(cfg.seed, epoch))
    rows, host_rows = staged.order(groups)  # the epoch's row order: one copy to the device
    starts = [0]
    for g in groups:
        starts.append(starts[-1] + len(g))
    start = prog.batch if prog.epoch == epoch - 1 else 0
    loss_sum = torch.full((), prog.loss_sum if start else 0.0, device=device)  # no copy
    seen = prog.seen if start else 0
    parts.top.train()
    shown = time.monotonic()
    k = start
    with (
        setup.reporter.task(f"epoch {epoch}/{cfg.epochs}", total=len(groups), unit="batch") as adv,
        explain_oom(f"epoch {epoch}", lambda: (k, prog.step), cfg),
    ):
        if start:
            adv(start)
        for k in range(start, len(groups)):
            if _stop_requested(setup, k):
                _interrupt(parts, prog, setup, epoch, k, loss_sum, seen)
            span = (starts[k], starts[k + 1])
            loss_sum += _step(parts, staged, groups[k], rows, host_rows, span, cfg, setup)
            prog.step += 1
            seen += len(groups[k])
            now = time.monotonic()
            if now - shown >= LOSS_EVERY_S or k == len(groups) - 1:
                adv(1, loss=float(loss_sum) / seen)  # the only read-back of the loss
                shown = now
            else:
                adv(1)
    return loss_sum, seen


def _step(parts: _Parts, staged: Staged, group, rows, host_rows, span, cfg, setup):
    """One optimizer step over the rows ``group`` (``rows[span[0]:span[1]]`` on the device),
    as micro-batches of ``cfg.batch_size`` whose gradients add up (DDP synchronises the last
    one only); each micro-batch's loss is its summed loss over the step's rows, so the step
    minimises the mean over all of them. Returns the step's summed loss (a device tensor)."""
    import torch
    import torch.nn.functional as F

    n = len(group)
    parts.optimizer.zero_grad(set_to_none=True)
    total = None
    for s in range(0, n, cfg.batch_size):
        e = min(s + cfg.batch_size, n)
        a, b = span[0] + s, span[0] + e
        inputs, mask, target = staged.batch(rows[a:b], host_rows[a:b], staged.width(group[s:e]))
        last = e == n
        sync = contextlib.nullcontext() if last or setup.world.size == 1 else parts.net.no_sync()
        with sync:
            with setup.precision.autocast():
                logits = parts.net(inputs, mask)
            summed = F.cross_entropy(logits.float(), target, reduction="sum")
            (summed / n).backward()
        total = summed.detach() if total is None else total + summed.detach()
    torch.nn.utils.clip_grad_norm_(
        [p for g in parts.optimizer.param_groups for p in g["params"]], MAX_GRAD_NORM
    )
    parts.optimizer.step()
    parts.scheduler.step()
    return total


def _interrupt(parts: _Parts, prog, setup, epoch, k, loss_sum, seen):
    """Stop before optimizer step ``k`` of ``epoch``: checkpoint this very point (each process
    keeps its own running loss), raise Interrupted."""
    setup.reporter.info(f"stopping before step {k + 1} of epoch {epoch} (interrupt)")
    prog.epoch, prog.batch, prog.loss_sum, prog.seen = epoch - 1, k, float(loss_sum), seen
    path = _checkpoint(parts, prog, setup)
    raise Interrupted(path, epoch - 1, k)


def _end_epoch(parts: _Parts, cfg, prog, setup, loss_sum, seen, t0):
    """Score the epoch, decide (once, on rank 0) whether it is the best and whether to stop,
    record it, checkpoint. Returns the stop decision."""
    epoch = prog.epoch + 1
    loss_total, rows = setup.world.sum([float(loss_sum), seen])
    val_loss, val_acc = _evaluate(parts, setup)
    best = prog.best
    improved = (val_acc, -val_loss) > (best["val_accuracy"], -best["val_loss"])
    bad_evals = 0 if improved else prog.bad_evals + 1
    decision = (improved, bad_evals, early_stop(cfg.patience, bad_evals, epoch, cfg.epochs))
    improved, bad_evals, stopped = setup.world.broadcast(decision)  # rank 0's, for everyone
    if improved:
        prog.best = {"epoch": epoch, "val_accuracy": val_acc, "val_loss": val_loss}
        prog.best_weights = ckpt.trainable_state(parts.model)
    record = {
        "epoch": epoch,
        "step": prog.step,
        "train_loss": loss_total / max(rows, 1),
        "val_loss": val_loss,
        "val_accuracy": val_acc,
        "lr": parts.scheduler.get_last_lr()[0],
        "improved": improved,
        "elapsed_s": round(time.perf_counter() - t0, 3),
    }
    prog.history.append(record)
    prog.epoch, prog.batch, prog.loss_sum, prog.seen, prog.bad_evals = epoch, 0, 0.0, 0, bad_evals
    _write_metrics(prog, setup)
    setup.reporter.info(
        f"epoch {epoch}: train_loss {record['train_loss']:.4f}  val_loss {val_loss:.4f}  "
        f"val_acc {val_acc:.4f}" + ("  (best)" if improved else "")
    )
    _checkpoint(parts, prog, setup)
    if setup.on_epoch_end is not None:
        setup.on_epoch_end(record)
    return stopped


def _write_metrics(prog: _Progress, setup: Setup) -> None:
    if setup.world.is_main:
        atomic_write_text(
            setup.out_dir / METRICS,
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in prog.history),
        )


def _checkpoint(parts: _Parts, prog: _Progress, setup: Setup) -> Path | None:
    """Save where the loop stands (rank 0 writes; every process gives its RNG state)."""
    if not setup.checkpoints:
        return None
    mine = {"loss_sum": prog.loss_sum, "seen": prog.seen}  # each process's own running loss
    rngs, sums = zip(*setup.world.gather((ckpt.rng_state(setup.device), mine)), strict=True)
    if not setup.world.is_main:
        return setup.checkpoint_path
    current = ckpt.trainable_state(parts.model)
    at_best = prog.best["epoch"] == prog.epoch and prog.batch == 0
    ckpt.save(
        setup.checkpoint_path,
        {
            "fingerprint": setup.fingerprint,
            "epoch": prog.epoch,
            "batch": prog.batch,
            "step": prog.step,
            "sums": list(sums),  # per process, in rank order
            "trainable": current,
            "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(),
            "rng": list(rngs),
            "best": prog.best,
            "best_weights": None if at_best else prog.best_weights,  # None: = trainable
            "bad_evals": prog.bad_evals,
            "history": prog.history,
        },
    )
    return setup.checkpoint_path
