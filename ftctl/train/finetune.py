"""Incremental fine-tuning (the seed's incremental_finetune.py) as steps read in order.

``train(cfg)``:

1. ``prepare_inputs``: check the model directory, the data and the labels (nothing written);
2. ``build_model``: load the classifier (fp32), grow its head if asked, freeze the embeddings +
   the first N layers;
3. ``mix_data`` + ``prepare_features``: replay mix, stratified validation split, tokenize, this
   process's share of the rows, the frozen prefix's output cached once per text;
4. ``fit`` (ftctl.train.fit): train the top layers with early stopping and checkpoints;
5. ``write_final``: OUTPUT/final/ (a plain HF directory + manifest.json), only when complete.

With several processes (``ftctl train --nproc N``: torchrun), every process runs the same
steps on its share of the rows; only rank 0 reports and writes.

Anti-forgetting measures (seed): low LR, replay of old data, frozen early layers, few epochs,
small batches, early stopping. Speed: the frozen prefix runs once per text (no autograd, no
dropout there), batches are length-bucketed and padded per batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ftctl.config import TrainConfig, size_bytes
from ftctl.data.examples import Example, load_examples
from ftctl.data.reconcile import Reconciliation, combine, reconcile
from ftctl.errors import ConfigError, DataError, Problem, TrainError
from ftctl.fsutil import atomic_dir, sha256_file
from ftctl.manifest import git_commit, model_sha256, package_versions, write_manifest
from ftctl.model.files import (
    TRAIN_DTYPE,
    check_supported,
    load_classifier,
    load_tokenizer,
    save_classifier,
)
from ftctl.model.inference import resolve_device
from ftctl.model.labels import resolve_labels
from ftctl.progress import NULL, Reporter
from ftctl.terms import seed_term
from ftctl.train import distributed
from ftctl.train.features import (
    CachePlan,
    Features,
    cache_prefix,
    encode,
    gpu_free_memory,
    host_free_memory,
    informative,
    place_cache,
    shard,
)
from ftctl.train.fit import (
    EpochHook,
    FitResult,
    Setup,
    explain_oom,
    fit,
    numerics,
    resolve_precision,
)
from ftctl.train.layers import freeze, grow_head

# ============================================================================ data mixing


@dataclass(frozen=True)
class Mix:
    """The training mix: new + replayed old data, split into train and validation."""

    train: list[Example]
    val: list[Example]
    n_new: int
    n_old_available: int
    n_replay: int
    replay_by_label: dict[str, int]

    def counts(self) -> dict[str, Any]:
        return {
            "new": self.n_new,
            "old_available": self.n_old_available,
            "replay": self.n_replay,
            "replay_by_label": self.replay_by_label,
            "train": len(self.train),
            "val": len(self.val),
        }


def replay_count(n_new: int, ratio: float, available: int) -> int:
    """Old examples to mix in so they make up ``ratio`` of the mix, capped at what exists."""
    if ratio <= 0 or available <= 0:
        return 0
    return min(available, round(n_new * ratio / (1 - ratio)))


def _by_label(examples: Sequence[Example]) -> dict[str, list[Example]]:
    groups: dict[str, list[Example]] = {}
    for ex in examples:
        groups.setdefault(ex.label, []).append(ex)
    return groups


def _allocate(sizes: dict[str, int], n: int) -> dict[str, int]:
    """Split ``n`` over groups proportionally to ``sizes``, at least one each when ``n`` allows
    (largest remainder; ties by name, so deterministic)."""
    total = sum(sizes.values())
    if n >= total:
        return dict(sizes)
    floor = 1 if n >= len(sizes) else 0
    share = {k: floor + (n - floor * len(sizes)) * v / total for k, v in sizes.items()}
    alloc = {k: min(sizes[k], int(s)) for k, s in share.items()}
    order = sorted(sizes, key=lambda k: (-(share[k] - int(share[k])), k))
    while sum(alloc.values()) < n:
        for k in order:
            if sum(alloc.values()) < n and alloc[k] < sizes[k]:
                alloc[k] += 1
    return alloc


def stratified_sample(examples: Sequence[Example], n: int, seed: int) -> list[Example]:
    """``n`` examples drawn so every label is present (when ``n`` >= labels), proportionally."""
    groups = _by_label(examples)
    alloc = _allocate({k: len(v) for k, v in groups.items()}, n)
    rng = random.Random(seed)
    out: list[Example] = []
    for label in sorted(groups):
        out += rng.sample(groups[label], alloc[label])
    return out


def stratified_split(
    examples: Sequence[Example], val_ratio: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, val): each label with >= 2 examples puts ~val_ratio of them (at least one) in val."""
    rng = random.Random(seed)
    train: list[Example] = []
    val: list[Example] = []
    for _label, group in sorted(_by_label(examples).items()):
        group = list(group)
        rng.shuffle(group)
        k = 0 if len(group) < 2 else min(len(group) - 1, max(1, round(len(group) * val_ratio)))
        val += group[:k]
        train += group[k:]
    rng.shuffle(train)
    return train, val


def mix_data(
    new: Sequence[Example],
    old: Sequence[Example],
    *,
    replay_ratio: float,
    val_ratio: float,
    seed: int,
) -> Mix:
    """New data + a stratified replay draw of old data, split stratified into train/val."""
    n_replay = replay_count(len(new), replay_ratio, len(old))
    replay = stratified_sample(old, n_replay, seed) if n_replay else []
    train, val = stratified_split([*new, *replay], val_ratio, seed + 1)
    if not val:  # no label has 2 examples: no validation loss, no early stopping, NaN metrics
        raise DataError(
            f"too little data: {len(new) + len(replay)} example(s) and no intent with at least "
            "2, so there is nothing to validate on",
            hint="give every intent several examples (`ftctl data generate` makes 120 each)",
        )
    return Mix(
        train=train,
        val=val,
        n_new=len(new),
        n_old_available=len(old),
        n_replay=len(replay),
        replay_by_label=dict(sorted(Counter(ex.label for ex in replay).items())),
    )


# ============================================================================ the result


@dataclass
class TrainResult:
    """What ``ftctl train`` / ``ftctl base`` report."""

    final_dir: Path
    manifest: dict[str, Any]  # empty on processes other than rank 0 (they write nothing)
    history: list[dict[str, Any]]  # epoch 0 (the model before training) first
    best_epoch: int
    val_accuracy: float
    val_loss: float
    stopped_early: bool
    replay: dict[str, Any]
    frozen_layers: int
    added_labels: list[str]
    device: str
    elapsed_s: float
    warnings: list[str] = field(default_factory=list)
    precision: str = "fp32"
    processes: int = 1

    @classmethod
    def of(cls, fitted: FitResult, mix: Mix, **rest: Any) -> TrainResult:
        """The result of a run whose loop gave ``fitted`` on ``mix``; ``rest``: the other
        fields (final_dir, manifest, frozen_layers, ...)."""
        return cls(
            history=fitted.history,
            best_epoch=fitted.best_epoch,
            val_accuracy=fitted.best["val_accuracy"],
            val_loss=fitted.best["val_loss"],
            stopped_early=fitted.stopped_early,
            replay=mix.counts(),
            **rest,
        )

    def summary(self) -> dict[str, Any]:
        return {
            "ok": True,
            "final_dir": str(self.final_dir),
            "best_epoch": self.best_epoch,
            "improved_on_base": self.best_epoch > 0,
            "val_accuracy": self.val_accuracy,
            "val_loss": self.val_loss,
            "stopped_early": self.stopped_early,
            "epochs_run": sum(1 for r in self.history if r["epoch"] > 0),
            "replay": self.replay,
            "frozen_layers": self.frozen_layers,
            "added_labels": self.added_labels,
            "device": self.device,
            "precision": self.precision,
            "processes": self.processes,
            "elapsed_s": round(self.elapsed_s, 3),
            "history": self.history,
            "warnings": self.warnings,
        }


# ============================================================================ step 1: inputs


@dataclass
class Inputs:
    """Every input, checked: what ``prepare_inputs`` gives the later steps."""

    model_path: Path
    new_paths: tuple[Path, ...]
    out_dir: Path
    tokenizer: Any
    new: list[Example]
    old: list[Example]
    unknown: dict[str, Example]  # labels the base model lacks (grown with --add-labels)
    n_layers: int
    labels: list[str]  # the base model's, named by --label-map when they are LABEL_i
    overlap: Reconciliation  # texts in both new and old data (relabels, repeats) taken out of old
    merged: Reconciliation  # texts in two new-data files: the later file's row kept


def _require(value: Path | None, flag: str) -> Path:
    if value is None:
        raise ConfigError(
            f"{flag} is required", hint=f"pass {flag} PATH or set it in ftctl.toml [train]"
        )
    return Path(value)


def _require_files(values: Sequence[Path], flag: str) -> tuple[Path, ...]:
    if not values:
        _require(None, flag)
    return tuple(Path(v) for v in values)


def _unknown_label_error(missing: dict[str, Example], n_known: int) -> DataError:
    problems = [
        Problem(f"label '{lab}' is not one of the base model's {n_known} labels", ex.file, ex.line)
        for lab, ex in missing.items()
    ]
    return DataError(
        "labels the base model does not know:\n" + "\n".join(f"  {p}" for p in problems),
        hint="fix the labels, or pass --add-labels to grow the classifier head "
        "(the old labels' rows are kept exactly)",
        problems=problems,
    )


def prepare_inputs(cfg: TrainConfig, warn: Callable[[str], None]) -> Inputs:
    """Check the model directory (without loading its weights), the data and the labels;
    nothing is written. Every problem is an FtctlError with a hint."""
    model_path = _require(cfg.model_path, "--model-path")
    new_paths = _require_files(cfg.new_data, "--new-data")
    out_dir = Path(cfg.output_path)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--output-path {out_dir}: exists and is not a directory")
    config = check_supported(model_path)
    if (out_dir / "final").resolve() == model_path.resolve():
        raise ConfigError(
            f"--output-path {out_dir} would replace the base model {model_path} itself",
            hint="write the fine-tuned model elsewhere, e.g. --output-path models/incremental",
        )
    labels = resolve_labels(model_path, cfg.label_map)
    tokenizer = load_tokenizer(model_path)  # "the same text" is what this model sees
    new, merged = combine(
        [load_examples(p, what="new data", tokenizer=tokenizer) for p in new_paths], tokenizer
    )  # on the same text the later file wins: the reviewed data over the generated
    old: list[Example] = []
    if cfg.old_data is not None:
        old = load_examples(cfg.old_data, what="old data", tokenizer=tokenizer)
    new, old, overlap = reconcile(new, old, tokenizer)  # the new label wins; one copy of repeats
    unknown: dict[str, Example] = {}
    for ex in [*new, *old]:
        if ex.label not in labels and ex.label not in unknown:
            unknown[ex.label] = ex
    if unknown and not cfg.add_labels:
        raise _unknown_label_error(unknown, len(labels))
    n_layers = int(config.get("num_hidden_layers", 0))
    if cfg.freeze_layers > n_layers:
        raise ConfigError(
            f"--freeze-layers {cfg.freeze_layers}: {model_path} has only {n_layers} layers",
            hint=f"use --freeze-layers between 0 and {n_layers}",
        )
    max_pos = int(config.get("max_position_embeddings", 512))
    if cfg.max_length > max_pos:
        raise ConfigError(
            f"--max-length {cfg.max_length}: the model takes at most {max_pos} tokens",
            hint=f"use --max-length {max_pos} or less",
        )
    new, dropped = informative(tokenizer, new)
    old, dropped_old = informative(tokenizer, old)
    if dropped or dropped_old:
        first = (dropped or dropped_old)[0]
        warn(
            f"{len(dropped) + len(dropped_old)} text(s) are all [UNK] for this tokenizer and "
            f"were dropped (first: {first.source} '{first.text}')"
        )
    if not new:
        raise DataError(
            f"{', '.join(map(str, new_paths))}: no usable examples after filtering (every text "
            "is all [UNK])",
            hint="the texts must use characters in the model's vocab.txt",
        )
    if not old:
        warn(
            "no --old-data: training on the new data alone; forgetting protection is reduced "
            f"(the seed's {seed_term('keep old data')}: pass --old-data with the original "
            "training data to mix in replay)"
        )
    return Inputs(
        model_path, new_paths, out_dir, tokenizer, new, old, unknown, n_layers, labels, overlap,
        merged,
    )  # fmt: skip


# ============================================================================ step 2: the model


@dataclass
class Built:
    """The model on its device, head grown, prefix frozen (and the frozen part's digest)."""

    model: Any
    added: list[str]
    frozen_names: list[str]
    frozen_sha256: str


def _tensor_sha(tensors: list[Any]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def frozen_digest(model, names: list[str]) -> str:
    params = dict(model.named_parameters())
    return _tensor_sha([params[n] for n in names])


def build_model(
    cfg: TrainConfig, inputs: Inputs, device: str, warn: Callable[[str], None]
) -> Built:
    """Load the classifier in fp32 (whatever dtype it was stored in: lr 5e-6 updates would
    round away in fp16), grow the head for ``inputs.unknown`` (seeded), move it to ``device``
    and freeze the embeddings + the first ``cfg.freeze_layers`` layers."""
    import torch

    model, _ = load_classifier(
        inputs.model_path, device="cpu", dtype=TRAIN_DTYPE, labels=inputs.labels
    )
    torch.manual_seed(cfg.seed)
    added: list[str] = []
    if inputs.unknown:
        added = grow_head(model, list(inputs.unknown))
        warn(f"--add-labels: classifier head grown by {len(added)}: {', '.join(added)}")
    model.to(device)
    names = freeze(model, cfg.freeze_layers)
    return Built(model, added, names, frozen_digest(model, names))


# ============================================================================ step 3: features


def prepare_features(
    cfg: TrainConfig, model, tokenizer, mix: Mix, setup: Setup
) -> tuple[Features, Features]:
    """(train, val) features of this process's share of the rows, tokenized, with the frozen
    prefix's output cached once per text when layers are frozen."""
    label2id = {lab: int(i) for i, lab in model.config.id2label.items()}
    world = setup.world
    train_all = encode(tokenizer, mix.train, label2id, cfg.max_length)
    val_all = encode(tokenizer, mix.val, label2id, cfg.max_length)
    if len(train_all) < world.size:
        raise DataError(
            f"{len(train_all)} training example(s) for {world.size} processes",
            hint="use fewer processes (--nproc) or more data",
        )
    train_feats = shard(train_all, world.rank, world.size, pad=True)
    val_feats = shard(val_all, world.rank, world.size, pad=False)
    if cfg.freeze_layers > 0:
        placement = cache_placement(cfg, model, [train_feats, val_feats], setup.device)
        setup.reporter.info(placement.text())
        model.eval()
        for feats, what in ((train_feats, "train"), (val_feats, "val")):
            with explain_oom("caching the frozen prefix", None, None):
                cache_prefix(
                    model,
                    feats,
                    cfg.freeze_layers,
                    setup.device,
                    setup.reporter,
                    what,
                    plan=placement,
                    autocast=setup.precision.autocast,
                    check=setup.check_stop,
                )
    return train_feats, val_feats


def cache_placement(cfg: TrainConfig, model, shares: Sequence[Features], device: str) -> CachePlan:
    """Where this process's frozen-prefix cache goes, estimated before it is built (its texts'
    tokens x hidden x 4 bytes): on the GPU under --cache-budget (auto: half the free memory),
    else pinned CPU memory; a cache that would not fit in CPU memory either is an error."""
    return place_cache(
        sum(len(f) for f in shares),
        sum(len(row) for f in shares for row in f.ids),
        int(model.config.hidden_size),
        cuda=device.startswith("cuda"),
        budget=None if cfg.cache_budget == "auto" else size_bytes(cfg.cache_budget),
        gpu_free=gpu_free_memory(device),
        host_free=host_free_memory(),
    )


# ============================================================================ step 5: output


def _fingerprint(cfg: TrainConfig, inputs: dict[str, Any]) -> str:
    """Identity of a run for --resume: every hyperparameter that changes the arithmetic, the
    inputs' digests and the number of processes."""
    ignored = ("device", "checkpoint", "require_improvement", "nproc", "nnodes", "rdzv_endpoint",
               "cache_budget")  # fmt: skip
    hp = {k: str(v) for k, v in dataclasses.asdict(cfg).items() if k not in ignored}
    blob = json.dumps({"hp": hp, "inputs": inputs}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def hyperparameters(cfg: TrainConfig) -> dict[str, Any]:
    def plain(v: Any) -> Any:
        return (
            str(v) if isinstance(v, Path) else [plain(x) for x in v] if isinstance(v, tuple) else v
        )

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def data_role(i: int) -> str:
    """The manifest's name of the i-th --new-data file: new, new_2, new_3, ..."""
    return "new" if i == 0 else f"new_{i + 1}"


def write_final(out_dir: Path, model, tokenizer, payload: dict[str, Any], **save: Any):
    """OUTPUT/final/ (weights, tokenizer, manifest) built beside and renamed, so it appears only
    when complete; the checkpoints are dropped once it exists. ``save``: save_classifier's
    like/save_format/dtype; what it wrote is the manifest's ``weights``. (final, manifest)."""
    final = out_dir / "final"
    with atomic_dir(final, overwrite=True) as tmp:
        weights = save_classifier(model, tokenizer, tmp, **save)
        manifest = write_manifest(tmp, {**payload, "weights": weights})
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    return final, manifest


def _no_improvement(result: FitResult, cfg: TrainConfig, out_dir: Path, warn) -> None:
    """Say plainly when no epoch beat the base model (epoch 0); an error if required."""
    if result.best_epoch > 0:
        return
    base = result.history[0]
    trained = [r for r in result.history if r["epoch"] > 0]
    best = max(trained, key=lambda r: (r["val_accuracy"], -r["val_loss"]), default=None)
    msg = (
        f"no epoch beat the base model on the validation split (base: val acc "
        f"{base['val_accuracy']:.4f}, val loss {base['val_loss']:.4f}"
        + (
            f"; best trained epoch {best['epoch']}: val acc {best['val_accuracy']:.4f}, "
            f"val loss {best['val_loss']:.4f})"
            if best
            else ")"
        )
    )
    if cfg.require_improvement:
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
        raise TrainError(
            msg + ": nothing written (--require-improvement)",
            hint="try more epochs, another --lr or more data; "
            f"{out_dir / 'metrics.jsonl'} has every epoch's figures",
        )
    warn(f"{msg}: final/ holds the base model's weights (--require-improvement: an error)")


# ============================================================================ the command


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    image_id: str | None = None,
    reporter: Reporter = NULL,
    on_epoch_end: EpochHook | None = None,
    stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Fine-tune ``cfg.model_path`` on ``cfg.new_data`` (+ replay of ``cfg.old_data``) and write
    ``cfg.output_path``/final/. Every input is checked before anything is written. ``stop`` is
    polled between steps: when it returns True, the loop checkpoints and raises
    :class:`ftctl.train.fit.Interrupted` (a KeyboardInterrupt)."""
    started = time.perf_counter()
    warnings: list[str] = []
    if resume and cfg.checkpoint == "none":
        raise ConfigError(
            "--resume with --checkpoint none: there is no checkpoint to continue from",
            hint="drop --resume, or train with --checkpoint epoch",
        )

    with distributed.session(resolve_device(cfg.device)) as (world, device):
        if not world.is_main:
            reporter = NULL  # rank 0 speaks for every process

        def warn(msg: str) -> None:
            warnings.append(msg)
            reporter.warn(msg)

        # --- 1. inputs, 2. the model
        reporter.stage("checking inputs")
        if (cfg.nproc > 1 or cfg.nnodes > 1) and world.size == 1:
            warn(
                f"nproc {cfg.nproc} / nnodes {cfg.nnodes} asked for, but this process was not "
                "started by torchrun: training in one process (`ftctl train --nproc N` launches)"
            )
        inputs = prepare_inputs(cfg, warn)
        for line in [*inputs.merged.messages(), *inputs.overlap.messages()]:
            reporter.info(line)
        precision = resolve_precision(cfg.precision, device)
        built = build_model(cfg, inputs, device, warn)
        model, n_layers = built.model, inputs.n_layers

        # --- 3. data: replay mix, stratified split
        mix = mix_data(
            inputs.new, inputs.old, replay_ratio=cfg.replay_ratio, val_ratio=cfg.val_ratio,
            seed=cfg.seed,
        )  # fmt: skip
        reporter.info(
            f"data: {mix.n_new} new + {mix.n_replay} replayed of {mix.n_old_available} old -> "
            f"{len(mix.train)} train / {len(mix.val)} val; {cfg.freeze_layers}/{n_layers} "
            f"layers frozen; device {device}, {precision.name}"
            + (f"; {world.size} processes" if world.size > 1 else "")
        )
        digests = {
            "base_model_sha256": model_sha256(inputs.model_path),
            "new_data_sha256": [sha256_file(p) for p in inputs.new_paths],
            "old_data_sha256": sha256_file(cfg.old_data) if cfg.old_data else None,
        }
        setup = Setup(
            device=device,
            out_dir=inputs.out_dir,
            world=world,
            precision=precision,
            fingerprint=_fingerprint(cfg, {**digests, "processes": world.size}),
            resume=resume,
            checkpoints=cfg.checkpoint == "epoch",
            reporter=reporter,
            on_epoch_end=on_epoch_end,
            stop=stop,
        )
        if world.is_main:
            inputs.out_dir.mkdir(parents=True, exist_ok=True)

        # --- 3. features, 4. the loop
        with numerics(device, precision) as det:
            reporter.stage("training")
            train_feats, val_feats = prepare_features(cfg, model, inputs.tokenizer, mix, setup)
            n_frozen = cfg.freeze_layers
            result = fit(model, train_feats, val_feats, cfg, n_frozen=n_frozen, setup=setup)

        # --- the frozen part did not move, bit for bit; the base model was beaten (or not)
        if frozen_digest(model, built.frozen_names) != built.frozen_sha256:
            raise TrainError("frozen parameters changed during training (a bug in ftctl)")
        _no_improvement(result, cfg, inputs.out_dir, warn)

        # --- 5. OUTPUT/final/ (rank 0; appears only when complete)
        final, manifest = inputs.out_dir / "final", {}
        if world.is_main:
            reporter.stage("writing the model")
            model.to("cpu").eval()
            payload = manifest_payload(
                cfg, inputs, built, mix, result, setup=setup, det=det, digests=digests,
                image_id=image_id,
            )  # fmt: skip
            final, manifest = write_final(
                inputs.out_dir, model, inputs.tokenizer, payload,
                like=inputs.model_path, save_format=cfg.save_format, dtype=cfg.save_dtype,
            )  # fmt: skip
        world.barrier()  # every process ends once final/ is complete
    return TrainResult.of(
        result,
        mix,
        final_dir=final,
        manifest=manifest,
        frozen_layers=cfg.freeze_layers,
        added_labels=built.added,
        device=device.split(":")[0],
        elapsed_s=time.perf_counter() - started,
        warnings=warnings,
        precision=precision.name,
        processes=world.size,
    )


def manifest_payload(
    cfg: TrainConfig,
    inputs: Inputs,
    built: Built,
    mix: Mix,
    result: FitResult,
    *,
    setup: Setup,
    det: dict[str, Any],
    digests: dict[str, Any],
    image_id: str | None,
) -> dict[str, Any]:
    """What manifest.json records of an incremental run (beside the files' sha256)."""
    model = built.model
    return {
        "kind": "incremental",
        "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "base_model": {"path": str(inputs.model_path), "sha256": digests["base_model_sha256"]},
        "data": {
            **{
                data_role(i): {"path": str(path), "sha256": sha}
                for i, (path, sha) in enumerate(
                    zip(inputs.new_paths, digests["new_data_sha256"], strict=True)
                )
            },
            "old": (
                {"path": str(cfg.old_data), "sha256": digests["old_data_sha256"]}
                if cfg.old_data
                else None
            ),
        },
        "hyperparameters": hyperparameters(cfg),
        "seed": cfg.seed,
        "labels": [model.config.id2label[i] for i in range(model.config.num_labels)],
        "added_labels": built.added,
        "label_map": (
            {"path": str(cfg.label_map), "sha256": sha256_file(cfg.label_map)}
            if cfg.label_map
            else None
        ),
        "data_overlap": inputs.overlap.to_dict(),
        "new_data_overlap": inputs.merged.to_dict(),
        "label_counts": {
            "train": dict(sorted(Counter(ex.label for ex in mix.train).items())),
            "val": dict(sorted(Counter(ex.label for ex in mix.val).items())),
        },
        "replay": mix.counts(),
        "frozen": {
            "layers": cfg.freeze_layers,
            "of": inputs.n_layers,
            "embeddings": cfg.freeze_layers > 0,
            "params": len(built.frozen_names),
            "sha256": built.frozen_sha256,
            "verified_unchanged": True,
        },
        "plan": result.plan,
        "metrics": result.history,
        "best": result.best,
        "improved_on_base": result.best_epoch > 0,
        "stopped_early": result.stopped_early,
        "resumed_from_epoch": result.resumed_from_epoch,
        "resumed_at_batch": result.resumed_at_batch,
        "device": setup.device.split(":")[0],
        "precision": setup.precision.record(cfg.precision),
        "distributed": _distributed_record(setup.world, setup.device),
        "determinism": det,
        "packages": package_versions(),
        "git_commit": git_commit(),
        "image_id": image_id,
    }


def _distributed_record(world: distributed.World, device: str) -> dict[str, Any]:
    if world.size == 1:
        return {"processes": 1}
    return {
        "processes": world.size,
        "backend": "nccl" if device.startswith("cuda") else "gloo",
        "rows": "each process trains on a fixed share (sorted by length, dealt in turn)",
    }
