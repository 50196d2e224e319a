"""ftctl train / ftctl base: the thin CLI over ftctl.train.finetune and ftctl.train.base."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ftctl import config as cfgmod
from ftctl.cli import common
from ftctl.config import TrainConfig
from ftctl.data.reconcile import with_reviewed
from ftctl.errors import OutOfMemory
from ftctl.terms import seed_term
from ftctl.train.base import BaseConfig

PathOpt = Annotated[Path | None, typer.Option()]


def _summary_table(result, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("epoch", "train loss", "val loss", "val acc", ""):
        table.add_column(col, justify="right")
    for rec in result.history:
        base = rec["epoch"] == 0
        table.add_row(
            "0 (base)" if base else str(rec["epoch"]),
            "-" if rec["train_loss"] is None else f"{rec['train_loss']:.4f}",
            f"{rec['val_loss']:.4f}",
            f"{rec['val_accuracy']:.4f}",
            "best" if rec["epoch"] == result.best_epoch else "",
        )
    return table


def _print_result(result, title: str) -> None:
    common.err.print(_summary_table(result, title))
    rp = result.replay
    common.out.print(
        f"wrote {result.final_dir}  (best epoch {result.best_epoch}, "
        f"val acc {result.val_accuracy:.4f}, {rp['train']} train / {rp['val']} val, "
        f"{seed_term('replay')} {rp['replay']} rows, "
        f"{seed_term('frozen layers')} {result.frozen_layers}, "
        f"{result.device}, {result.elapsed_s:.1f} s)"
    )


class StopOnSignal:
    """SIGINT and SIGTERM ask the training to stop after the step it is in (it then writes a
    checkpoint and says how to resume); a second signal stops at once. Call it to poll."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self) -> bool:
        return self.signal is not None

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopOnSignal]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        before = {sig: signal.getsignal(sig) for sig in signals}

        def handler(signum, frame) -> None:
            if self.signal is not None:
                raise KeyboardInterrupt  # the second one: now
            self.signal = signum

        for sig in signals:
            signal.signal(sig, handler)
        try:
            yield self
        finally:
            for sig, old in before.items():
                signal.signal(sig, old)


def _interrupted(exc, output_path: Path) -> None:
    """Rank 0 says what was kept; every process then leaves with 130 (interrupted)."""
    from ftctl.train import distributed

    if distributed.env_world()[0] != 0:
        raise typer.Exit(130)
    if getattr(exc, "checkpoint", None) is not None:
        common.err.print(
            f"checkpoint kept ({exc.checkpoint}): run the same command with --resume to continue"
        )
    elif isinstance(exc, KeyboardInterrupt) and (output_path / "checkpoints").is_dir():
        common.err.print("checkpoint kept: run the same command with --resume to continue")
    else:
        common.err.print("nothing was kept: the next run starts from the beginning")
    raise KeyboardInterrupt from None


def retry_command(args: Sequence[str], batch_size: int, grad_accum: int) -> str:
    """``ftctl ARGS`` with --batch-size and --grad-accum set to these values (the other
    words as given; inside --docker, with --docker, as the user runs it)."""
    out: list[str] = []
    words = list(args)
    i = 0
    while i < len(words):
        word = words[i]
        name = word.split("=", 1)[0]
        if name in ("--batch-size", "--grad-accum"):
            i += 1 if "=" in word else 2
            continue
        out.append(word)
        i += 1
    where = out.index("train") + 1 if "train" in out else len(out)
    out[where:where] = ["--batch-size", str(batch_size), "--grad-accum", str(grad_accum)]
    if os.environ.get("FTCTL_HOST_PATHS") and "--docker" not in out:
        out.append("--docker")  # the command ran inside the image: the user's has --docker
    return "ftctl " + shlex.join(out)


def _out_of_memory(ctx: typer.Context, exc: OutOfMemory) -> OutOfMemory:
    """The same error with the exact command that keeps the effective batch on half the
    memory: --batch-size halved, --grad-accum doubled (8 x 1 -> 4 x 2)."""
    if exc.batch_size is None:
        return exc
    smaller, accum = max(1, exc.batch_size // 2), exc.grad_accum * 2
    command = retry_command(ctx.meta.get("ftctl.args") or [], smaller, accum)
    exc.hint = (
        "the seed's answer (GPU 内存不足): a smaller --batch-size, or more --freeze-layers. "
        f"The same effective batch ({exc.batch_size * exc.grad_accum} rows per step) on half "
        f"the memory: {command}"
    )
    return exc


def _launch(ctx: typer.Context, cfg) -> None:
    """--nproc/--nnodes: check the inputs once here, then run this same command in every
    process through torchrun; leave with the processes' exit code."""
    from ftctl.train import distributed
    from ftctl.train.inputs import prepare_inputs

    distributed.check_launch(cfg.nproc, cfg.nnodes, cfg.rdzv_endpoint, cfg.device)
    prepare_inputs(cfg, lambda _message: None)  # an input error is reported once, here
    sys_args = ctx.meta.get("ftctl.args") or []
    raise typer.Exit(
        distributed.launch(
            sys_args,
            nproc=cfg.nproc,
            nnodes=cfg.nnodes,
            rdzv_endpoint=cfg.rdzv_endpoint,
            debug=common.state(ctx).debug,
        )
    )


def _config(ctx: typer.Context, *, reviewed: bool, new_data, **flags) -> TrainConfig:
    """[train] of ftctl.toml with the flags given on top, [data] reviewed added to the new data
    (unless --no-reviewed), checked: what the training runs with."""
    conf = common.config(ctx)
    cfg = cfgmod.override(conf.train, new_data=tuple(new_data) if new_data else None, **flags)
    extended = with_reviewed(cfg.new_data, conf.data.reviewed) if reviewed else None
    return cfgmod.with_flags(cfg, new_data=extended)


# `ftctl train`'s options, declared once (the command's signature names them)
NewDataOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--new-data",
        help="Incremental data (.jsonl or .csv); repeatable: on the same text a later "
        "file's label wins.",
    ),
]
ReviewedOpt = Annotated[
    bool,
    typer.Option(
        "--reviewed/--no-reviewed",
        help="Also train on the reviewed data ([data] reviewed) when it exists, as the last "
        "--new-data file (a reviewed label wins).",
    ),
]
OldDataOpt = Annotated[
    Path | None,
    typer.Option("--old-data", help="Original training data to replay (anti-forgetting)."),
]
ModelPathOpt = Annotated[
    Path | None, typer.Option("--model-path", help="Base classifier directory (HF format).")
]
OutputPathOpt = Annotated[
    Path | None,
    typer.Option(
        "--output-path",
        help="Writes OUTPUT/final/.",
        show_default=common.default_text(TrainConfig, "output_path"),
    ),
]
EpochsOpt = Annotated[
    int | None,
    typer.Option(help="Epochs.", show_default=common.default_text(TrainConfig, "epochs")),
]
BatchSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        help="Batch size.",
        show_default=common.default_text(TrainConfig, "batch_size"),
    ),
]
LrOpt = Annotated[
    float | None,
    typer.Option(help="Learning rate.", show_default=common.default_text(TrainConfig, "lr")),
]
ReplayRatioOpt = Annotated[
    float | None,
    typer.Option(
        "--replay-ratio",
        help="Share of old data in the mix.",
        show_default=common.default_text(TrainConfig, "replay_ratio"),
    ),
]
FreezeLayersOpt = Annotated[
    int | None,
    typer.Option(
        "--freeze-layers",
        help="Freeze embeddings + the first N encoder layers (0: none).",
        show_default=common.default_text(TrainConfig, "freeze_layers"),
    ),
]
PatienceOpt = Annotated[
    int | None,
    typer.Option(
        help="Early stop after N epochs without improvement (0: never).", show_default="1"
    ),
]
ValRatioOpt = Annotated[
    float | None,
    typer.Option(
        "--val-ratio",
        help="Stratified validation share.",
        show_default=common.default_text(TrainConfig, "val_ratio"),
    ),
]
MaxLengthOpt = Annotated[
    int | None,
    typer.Option(
        "--max-length",
        help="Tokens per text.",
        show_default=common.default_text(TrainConfig, "max_length"),
    ),
]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from OUTPUT/checkpoints/.")]
AddLabelsOpt = Annotated[
    bool | None,
    typer.Option(
        "--add-labels/--no-add-labels",
        help="Grow the classifier head for labels the base model lacks.",
        show_default=common.default_text(TrainConfig, "add_labels"),
    ),
]
PrecisionOpt = Annotated[
    str | None,
    typer.Option(
        "--precision",
        help="auto (bf16 autocast on a CUDA GPU that has it, else fp32) | fp32 | bf16.",
        show_default=common.default_text(TrainConfig, "precision"),
    ),
]
CheckpointOpt = Annotated[
    str | None,
    typer.Option(
        "--checkpoint",
        help="epoch: keep OUTPUT/checkpoints/ for --resume | none.",
        show_default=common.default_text(TrainConfig, "checkpoint"),
    ),
]
RequireImprovementOpt = Annotated[
    bool | None,
    typer.Option(
        "--require-improvement/--no-require-improvement",
        help="Fail when no epoch beats the base model on the validation split.",
        show_default=common.default_text(TrainConfig, "require_improvement"),
    ),
]
NprocOpt = Annotated[
    int | None,
    typer.Option(
        "--nproc",
        help="Processes on this machine (torchrun; one GPU each on CUDA).",
        show_default=common.default_text(TrainConfig, "nproc"),
    ),
]
NnodesOpt = Annotated[
    int | None,
    typer.Option(
        "--nnodes",
        help="Machines, each running this command.",
        show_default=common.default_text(TrainConfig, "nnodes"),
    ),
]
RdzvEndpointOpt = Annotated[
    str | None,
    typer.Option(
        "--rdzv-endpoint", help="With --nnodes: HOST:PORT of the rendezvous (one machine)."
    ),
]
LabelMapOpt = Annotated[
    Path | None,
    typer.Option(
        "--label-map",
        help="Intent names for a model whose labels are LABEL_0, LABEL_1...: JSON "
        '{"0": "CLOCK_IN", ...} or CSV id,intent.',
    ),
]
SaveFormatOpt = Annotated[
    str | None,
    typer.Option(
        "--save-format",
        help="Weights to write: auto (model.safetensors, plus pytorch_model.bin when the "
        "input had one), safetensors, bin or both.",
        show_default=common.default_text(TrainConfig, "save_format"),
    ),
]
SaveDtypeOpt = Annotated[
    str | None,
    typer.Option(
        "--save-dtype",
        help="dtype of the saved weights: auto (the input's), float32, float16 or bfloat16. "
        "Training itself always runs in float32.",
        show_default=common.default_text(TrainConfig, "save_dtype"),
    ),
]
GradAccumOpt = Annotated[
    int | None,
    typer.Option(
        "--grad-accum",
        help="Batches whose gradients add up to one optimizer step: --batch-size 4 "
        "--grad-accum 2 trains as --batch-size 8 on half the GPU memory.",
        show_default=common.default_text(TrainConfig, "grad_accum"),
    ),
]
CacheBudgetOpt = Annotated[
    str | None,
    typer.Option(
        "--cache-budget",
        help="GPU memory the frozen-prefix cache may take: auto (half the free memory) or "
        'a size such as "8g"; a larger cache goes to pinned CPU memory ("0": always).',
        show_default=common.default_text(TrainConfig, "cache_budget"),
    ),
]


def train(
    ctx: typer.Context,
    new_data: NewDataOpt = None,
    reviewed: ReviewedOpt = True,
    old_data: OldDataOpt = None,
    model_path: ModelPathOpt = None,
    output_path: OutputPathOpt = None,
    epochs: EpochsOpt = None,
    batch_size: BatchSizeOpt = None,
    lr: LrOpt = None,
    replay_ratio: ReplayRatioOpt = None,
    freeze_layers: FreezeLayersOpt = None,
    seed: common.SeedOpt = None,
    patience: PatienceOpt = None,
    val_ratio: ValRatioOpt = None,
    max_length: MaxLengthOpt = None,
    device: common.DeviceOpt = None,
    resume: ResumeOpt = False,
    add_labels: AddLabelsOpt = None,
    precision: PrecisionOpt = None,
    checkpoint: CheckpointOpt = None,
    require_improvement: RequireImprovementOpt = None,
    nproc: NprocOpt = None,
    nnodes: NnodesOpt = None,
    rdzv_endpoint: RdzvEndpointOpt = None,
    label_map: LabelMapOpt = None,
    save_format: SaveFormatOpt = None,
    save_dtype: SaveDtypeOpt = None,
    grad_accum: GradAccumOpt = None,
    cache_budget: CacheBudgetOpt = None,
    docker: common.DockerOpt = False,
    gpus: common.GpusOpt = None,
    image: common.ImageOpt = None,
    shm_size: common.ShmSizeOpt = None,
    ipc: common.IpcOpt = None,
    json_out: common.JsonOpt = False,
) -> None:
    """Fine-tune the classifier incrementally (replay, frozen layers, early stopping).

    The output keeps the input's tokenizer files byte for byte, its weight format and dtype.

    Example:

        ftctl train --new-data data/incremental_training_data.jsonl
        --old-data data/original_training_data.jsonl
        --model-path models/chinese-roberta-wwm-ext-classifier/final
        --output-path models/incremental --epochs 2 --batch-size 8 --lr 5e-6
        --replay-ratio 0.5 --freeze-layers 8

    On two GPUs (or two CPU processes): the same command with --nproc 2. Out of GPU memory:
    --batch-size 4 --grad-accum 2 trains as batch 8 on half the memory.
    """
    if docker:
        from ftctl.cli.docker_run import check_train_in_docker, rerun_in_docker

        used = check_train_in_docker(ctx)  # --gpus auto: one GPU per training process
        raise typer.Exit(
            rerun_in_docker(ctx, gpus=gpus, image=image, gpus_used=used, shm_size=shm_size, ipc=ipc)
        )
    cfg = _config(
        ctx,
        reviewed=reviewed,
        new_data=new_data,
        old_data=old_data,
        model_path=model_path,
        output_path=output_path,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        replay_ratio=replay_ratio,
        freeze_layers=freeze_layers,
        seed=seed,
        patience=patience,
        val_ratio=val_ratio,
        max_length=max_length,
        device=device,
        add_labels=add_labels,
        precision=precision,
        checkpoint=checkpoint,
        require_improvement=require_improvement,
        nproc=nproc,
        nnodes=nnodes,
        rdzv_endpoint=rdzv_endpoint,
        label_map=label_map,
        save_format=save_format,
        save_dtype=save_dtype,
        grad_accum=grad_accum,
        cache_budget=cache_budget,
    )
    from ftctl.train import distributed

    if (cfg.nproc > 1 or cfg.nnodes > 1) and not distributed.in_worker():
        _launch(ctx, cfg)
    from ftctl.train.finetune import train as run_train

    stop = StopOnSignal()
    try:
        with stop.installed():
            result = run_train(
                cfg,
                resume=resume,
                image_id=os.environ.get("FTCTL_IMAGE_ID") or None,
                reporter=common.reporter(ctx),
                stop=stop,
            )
    except KeyboardInterrupt as exc:
        _interrupted(exc, Path(cfg.output_path))
    except OutOfMemory as exc:
        raise _out_of_memory(ctx, exc) from None
    if distributed.env_world()[0] != 0:
        return  # rank 0 reports for every process
    if json_out:
        common.emit_json(ctx, result.summary())
    else:
        _print_result(result, "ftctl train")


def base(
    ctx: typer.Context,
    data: Annotated[
        Path | None, typer.Option("--data", help="Training data (.jsonl or .csv).")
    ] = None,
    output_path: Annotated[
        Path | None, typer.Option("--output-path", help="Writes OUTPUT/final/.")
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(help="Epochs.", show_default=common.default_text(BaseConfig, "epochs")),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            help="Peak learning rate.", show_default=common.default_text(BaseConfig, "lr")
        ),
    ] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Batch size.")] = None,
    hidden_size: Annotated[
        int | None, typer.Option("--hidden-size", help="Hidden size (heads = hidden / 32).")
    ] = None,
    seed: common.SeedOpt = None,
    device: common.DeviceOpt = None,
    max_length: Annotated[int | None, typer.Option("--max-length", help="Tokens per text.")] = None,
    json_out: common.JsonOpt = False,
) -> None:
    """Train a small 12-layer char-level Chinese BERT classifier from scratch (demo, tests).

    It stands in for chinese-roberta-wwm-ext, which cannot be downloaded here: same class, same
    files, so `ftctl train --model-path OUTPUT/final` works on it unchanged.

    Example:

        ftctl base --data data/original_training_data.jsonl
        --output-path models/chinese-roberta-wwm-ext-classifier
    """
    if data is None or output_path is None:
        from ftctl.errors import ConfigError

        raise ConfigError(
            "--data and --output-path are required",
            hint="e.g. ftctl base --data data/original_training_data.jsonl "
            "--output-path models/chinese-roberta-wwm-ext-classifier",
        )
    from ftctl.train.base import BaseConfig, build_base

    bcfg = cfgmod.with_flags(
        BaseConfig(data=data, output_path=output_path),
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        hidden_size=hidden_size,
        seed=seed,
        device=device,
        max_length=max_length,
    )
    stop = StopOnSignal()
    try:
        with stop.installed():
            result = build_base(bcfg, reporter=common.reporter(ctx), stop=stop)
    except KeyboardInterrupt as exc:
        _interrupted(exc, Path(bcfg.output_path))
    if json_out:
        common.emit_json(ctx, result.summary())
    else:
        _print_result(result, "ftctl base")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("train")(train)
    app.command("base")(base)
