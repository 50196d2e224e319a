"""Incremental fine-tuning (the seed's incremental_finetune.py) as steps read in order.

``train(cfg)``:

1. ``prepare_inputs`` (:mod:`.inputs`): check the model directory, the data and the labels
   (nothing written);
2. ``build_model`` (:mod:`.layers`): load the classifier (fp32), grow its head if asked, freeze
   the embeddings + the first N layers;
3. ``mix_data`` (:mod:`.mix`) + ``prepare_features`` (here): replay mix, stratified validation
   split, tokenize, this process's share of the rows, the frozen prefix's output cached once
   per text;
4. ``fit`` (:mod:`.fit`): train the top layers with early stopping and checkpoints;
5. ``write_final`` (:mod:`.output`): OUTPUT/final/ (a plain HF directory + manifest.json), only
   when complete.

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
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ftctl.config import TrainConfig, size_bytes
from ftctl.errors import ConfigError, DataError, TrainError
from ftctl.fsutil import sha256_file
from ftctl.manifest import model_sha256
from ftctl.model.inference import resolve_device
from ftctl.progress import NULL, Reporter
from ftctl.train import distributed
from ftctl.train.features import (
    CachePlan,
    Features,
    cache_prefix,
    encode,
    gpu_free_memory,
    host_free_memory,
    place_cache,
    shard,
)
from ftctl.train.fit import EpochHook, FitResult, Setup, fit
from ftctl.train.inputs import prepare_inputs
from ftctl.train.layers import build_model, frozen_digest
from ftctl.train.mix import Mix, mix_data
from ftctl.train.numerics import explain_oom, numerics, resolve_precision
from ftctl.train.output import TrainResult, manifest_payload, write_final

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


# ======================================================================= resume, no improvement


def _fingerprint(cfg: TrainConfig, inputs: dict[str, Any]) -> str:
    """Identity of a run for --resume: every hyperparameter that changes the arithmetic, the
    inputs' digests and the number of processes."""
    ignored = ("device", "checkpoint", "require_improvement", "nproc", "nnodes", "rdzv_endpoint",
               "cache_budget")  # fmt: skip
    hp = {k: str(v) for k, v in dataclasses.asdict(cfg).items() if k not in ignored}
    blob = json.dumps({"hp": hp, "inputs": inputs}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


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


def _digests(cfg: TrainConfig, inputs) -> dict[str, Any]:
    """The sha256 of what the run starts from: the base model, the new and the old data."""
    return {
        "base_model_sha256": model_sha256(inputs.model_path),
        "new_data_sha256": [sha256_file(p) for p in inputs.new_paths],
        "old_data_sha256": sha256_file(cfg.old_data) if cfg.old_data else None,
    }


def _data_line(
    mix: Mix, cfg: TrainConfig, n_layers: int, device, precision: str, procs: int
) -> str:
    return (
        f"data: {mix.n_new} new + {mix.n_replay} replayed of {mix.n_old_available} old -> "
        f"{len(mix.train)} train / {len(mix.val)} val; {cfg.freeze_layers}/{n_layers} "
        f"layers frozen; device {device}, {precision}"
        + (f"; {procs} processes" if procs > 1 else "")
    )


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
        reporter.info(_data_line(mix, cfg, n_layers, device, precision.name, world.size))
        digests = _digests(cfg, inputs)
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
