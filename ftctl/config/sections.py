"""The sections of ``ftctl.toml``: one frozen dataclass per table, its defaults and checks.

Each class's ``problems()`` lists every out-of-range value (never raises); the defaults are the
seed's. :mod:`ftctl.config.load` builds them from the file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ftctl.errors import ConfigError, Problem
from ftctl.remote import parse_host

SIZE = re.compile(r"[0-9]+[bkmgBKMG]?")  # a size in docker's syntax: "16g", "512m", "1024"
_UNITS = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
SEED_REMOTE_DIR = "/www/wwwroot/python-services/models/chinese-roberta-wwm-ext-classifier"
SEED_PAIRS: tuple[tuple[str, str], ...] = (
    ("PROCESSING_BATCH_LIST", "MATERIAL_BATCH_QUERY"),
    ("CLOCK_IN", "ATTENDANCE_TODAY"),
    ("SHIPMENT_STATS", "MATERIAL_BATCH_QUERY"),
)


def size_bytes(text: str) -> int:
    """A size in docker's syntax ("16g", "512m", "1024": bytes) in bytes."""
    if not SIZE.fullmatch(text):
        raise ValueError(f"not a size: {text!r}")
    unit = text[-1].lower()
    return int(text[:-1]) * _UNITS[unit] if unit in _UNITS else int(text)


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: training-data generation (the seed's generate_training_data.py)."""

    templates: Path = Path("data/incremental_samples.yaml")  # template file users edit
    out_dir: Path = Path("data")  # where generated files land
    name: str = "incremental_training_data"  # output file stem (.jsonl / .csv)
    per_intent: int = 120  # samples per intent after expansion (balanced)
    seed: int = 42  # generation is deterministic for a seed
    format: str = "both"  # jsonl | csv | both
    max_chars: int = 128  # longer texts are validation errors
    reviewed: Path = Path("data/reviewed.jsonl")  # import-review appends here; generate never
    #                                                writes it; train uses it last (it wins)

    def problems(self) -> list[Problem]:
        out = []
        if self.per_intent < 1:
            out.append(Problem("must be >= 1", field="data.per_intent"))
        if self.format not in ("jsonl", "csv", "both"):
            out.append(Problem("must be jsonl, csv or both", field="data.format"))
        if self.max_chars < 1:
            out.append(Problem("must be >= 1", field="data.max_chars"))
        return out


@dataclass(frozen=True)
class TrainConfig:
    """``[train]``: incremental fine-tuning; defaults are the seed's anti-forgetting values."""

    new_data: tuple[Path, ...] = ()  # incremental data files (required); on the same text a
    #                                  later file's label wins ([data] reviewed goes last)
    old_data: Path | None = None  # replay source; without it forgetting protection is reduced
    model_path: Path | None = None  # base classifier directory (HF format, required)
    output_path: Path = Path("models/incremental")  # OUTPUT/final/ is written here
    epochs: int = 2  # few epochs (seed)
    batch_size: int = 8  # small batches (seed)
    lr: float = 5e-6  # low learning rate (seed: 10-20x below the initial training)
    replay_ratio: float = 0.5  # share of old data in the training mix (seed)
    freeze_layers: int = 8  # embeddings + first N encoder layers frozen (seed)
    seed: int = 42  # every random choice derives from it
    patience: int = 1  # early stopping: evaluations without improvement before stopping
    val_ratio: float = 0.1  # stratified validation split of new + replay data
    max_length: int = 64  # tokens per text (the requests are short)
    device: str = "auto"  # auto | cpu | cuda
    add_labels: bool = False  # grow the head for labels the base model lacks
    weight_decay: float = 0.01  # AdamW weight decay
    warmup_ratio: float = 0.1  # linear warmup share of the steps
    precision: str = "auto"  # auto (bf16 autocast on a CUDA GPU with bf16, else fp32) | fp32 | bf16
    checkpoint: str = "epoch"  # epoch: OUTPUT/checkpoints/ after every epoch (for --resume) | none
    require_improvement: bool = False  # no epoch beating the base model (epoch 0) is an error
    nproc: int = 1  # processes on this machine (torchrun; one GPU each on CUDA)
    nnodes: int = 1  # machines, each running the same command (needs rdzv_endpoint)
    rdzv_endpoint: str | None = None  # HOST:PORT all machines reach (torchrun's c10d rendezvous)
    label_map: Path | None = None  # id -> intent (JSON/CSV) for a model with LABEL_i names
    save_format: str = "auto"  # auto (safetensors + the input's format) | safetensors | bin | both
    save_dtype: str = "auto"  # auto (the input's stored dtype) | float32 | float16 | bfloat16
    grad_accum: int = 1  # micro-batches summed per optimizer step (effective batch: batch x N)
    cache_budget: str = "auto"  # GPU memory for the frozen-prefix cache: auto (half the free
    #                             memory) | a size ("8g"; "0": pinned CPU memory, streamed)

    def __post_init__(self) -> None:  # one file given alone (TrainConfig(new_data=path))
        if isinstance(self.new_data, str | os.PathLike):
            object.__setattr__(self, "new_data", (Path(self.new_data),))

    def problems(self) -> list[Problem]:
        out = []
        if self.cache_budget != "auto" and not SIZE.fullmatch(self.cache_budget):
            out.append(Problem('must be auto or a size such as "8g"', field="train.cache_budget"))
        if self.save_format not in ("auto", "safetensors", "bin", "both"):
            out.append(Problem("must be auto, safetensors, bin or both", field="train.save_format"))
        if self.save_dtype not in ("auto", "float32", "float16", "bfloat16"):
            out.append(
                Problem("must be auto, float32, float16 or bfloat16", field="train.save_dtype")
            )
        for name in ("epochs", "batch_size", "max_length", "nproc", "nnodes", "grad_accum"):
            if getattr(self, name) < 1:
                out.append(Problem("must be >= 1", field=f"train.{name}"))
        if self.precision not in ("auto", "fp32", "bf16"):
            out.append(Problem("must be auto, fp32 or bf16", field="train.precision"))
        if self.checkpoint not in ("epoch", "none"):
            out.append(Problem("must be epoch or none", field="train.checkpoint"))
        if self.nnodes > 1 and not self.rdzv_endpoint:
            out.append(Problem("needs rdzv_endpoint (HOST:PORT)", field="train.nnodes"))
        if not self.lr > 0:
            out.append(Problem("must be > 0", field="train.lr"))
        if not 0 <= self.replay_ratio < 1:
            out.append(Problem("must be in [0, 1)", field="train.replay_ratio"))
        if self.freeze_layers < 0:
            out.append(Problem("must be >= 0", field="train.freeze_layers"))
        if self.patience < 0:
            out.append(Problem("must be >= 0", field="train.patience"))
        if not 0 < self.val_ratio < 1:
            out.append(Problem("must be in (0, 1)", field="train.val_ratio"))
        if self.device not in ("auto", "cpu", "cuda"):
            out.append(Problem("must be auto, cpu or cuda", field="train.device"))
        if not 0 <= self.warmup_ratio < 1:
            out.append(Problem("must be in [0, 1)", field="train.warmup_ratio"))
        return out


@dataclass(frozen=True)
class EvalConfig:
    """``[eval]``: the comprehensive test (seed: ``comprehensive_test.py 500 12345``) and gate."""

    test_data: Path = Path("data/test_cases.jsonl")  # held-out pool the cases are drawn from
    samples: int = 500  # cases drawn (stratified across intents)
    seed: int = 12345  # the draw is deterministic for a seed
    max_drop: float = 2.0  # an intent may lose at most this many accuracy points ...
    alpha: float = 0.05  # ... beyond what chance explains at this significance level
    batch_size: int = 64  # inference batch size
    max_length: int = 64  # tokens per text
    report_dir: Path | None = None  # report.json, report.md and plots land here
    pairs: tuple[tuple[str, str], ...] = SEED_PAIRS  # confused pairs that must not get worse
    device: str = "auto"  # auto | cpu | cuda

    def problems(self) -> list[Problem]:
        out = []
        if self.samples < 1:
            out.append(Problem("must be >= 1", field="eval.samples"))
        if self.max_drop < 0:
            out.append(Problem("must be >= 0", field="eval.max_drop"))
        if not 0 < self.alpha < 1:
            out.append(Problem("must be in (0, 1)", field="eval.alpha"))
        if self.batch_size < 1:
            out.append(Problem("must be >= 1", field="eval.batch_size"))
        for i, pair in enumerate(self.pairs):
            if len(pair) != 2:
                out.append(Problem("each pair needs exactly two intents", field=f"eval.pairs[{i}]"))
        if self.max_length < 1:
            out.append(Problem("must be >= 1", field="eval.max_length"))
        if self.device not in ("auto", "cpu", "cuda"):
            out.append(Problem("must be auto, cpu or cuda", field="eval.device"))
        return out


# The official CUDA PyTorch runtime, pinned by digest (ENVIRONMENT.md: read, identical, from
# several public repositories; torch 2.9.1 + CUDA 12.8 covers Hopper GPUs).
DEFAULT_BASE_IMAGE = (
    "pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime"
    "@sha256:7b324d212a4450795b49edba9949b7cdc72429148a64e974334bfe5774d51385"
)


GPUS_VALUES = "auto, all, none, a count (2) or device ids (0,2)"
_GPU_ID = r"(?:[0-9]+|GPU-[0-9a-fA-F-]+|MIG-[0-9A-Za-z/-]+)"  # an index or a (MIG) UUID
_GPU_IDS = re.compile(rf"^(device=)?{_GPU_ID}(,{_GPU_ID})*$")


def gpus_problem(value: str) -> str | None:
    """Why ``value`` is not a valid ``--gpus`` / ``[image] gpus`` (None when it is)."""
    if value in ("auto", "all", "none") or value.isdigit():
        return None
    if _GPU_IDS.match(value) and ("," in value or value.startswith("device=")):
        return None
    return f"must be {GPUS_VALUES}"


@dataclass(frozen=True)
class ImageConfig:
    """``[image]``: the reproducible training image and the runs of ``--docker`` inside it."""

    base_image: str = DEFAULT_BASE_IMAGE  # BASE_IMAGE build arg, pinned by digest
    tag: str = "ftctl:latest"  # what `image build` tags (besides ftctl:<version>-<sha>) and
    #                             what --docker runs when no --image is given
    dockerfile: Path = Path("Dockerfile")  # relative to the build context
    context: Path = Path(".")  # the project root
    gpus: str = "auto"  # auto | all | none | N | 0,2 (auto: what the command uses, if any)
    network: str = "none"  # none | host: network of runs inside the image (none = offline)
    read_timeout: float = 600.0  # seconds an engine request may take (a run's log has no limit)
    stop_grace: float = 60.0  # seconds between SIGINT to a run (Ctrl-C) and SIGTERM/SIGKILL
    memory: str | None = None  # memory limit of a run (docker syntax: "16g"); None: no limit
    shm_size: str = "auto"  # /dev/shm of a run: auto (1g per process of train --nproc N > 1,
    #                         else docker's 64m) | a size ("8g"); unused with ipc = "host"
    ipc: str = "private"  # private | host (the host's IPC namespace and /dev/shm, for NCCL)

    def problems(self) -> list[Problem]:
        out = []
        why = gpus_problem(self.gpus)
        if why:
            out.append(Problem(why, field="image.gpus"))
        if self.network not in ("none", "host"):
            out.append(Problem("must be none or host", field="image.network"))
        if not self.tag or any(c.isspace() for c in self.tag):
            out.append(Problem("must be an image tag such as ftctl:latest", field="image.tag"))
        if self.read_timeout <= 0:
            out.append(Problem("must be > 0 seconds", field="image.read_timeout"))
        if self.stop_grace < 0:
            out.append(Problem("must be >= 0 seconds", field="image.stop_grace"))
        if self.memory is not None and not SIZE.fullmatch(self.memory):
            out.append(Problem('must be a size such as "16g" or "512m"', field="image.memory"))
        if self.shm_size != "auto" and not SIZE.fullmatch(self.shm_size):
            out.append(Problem('must be auto or a size such as "8g"', field="image.shm_size"))
        if self.ipc not in ("private", "host"):
            out.append(Problem("must be private or host", field="image.ipc"))
        return out


@dataclass(frozen=True)
class DeployConfig:
    """``[deploy.<profile>]``: one target environment. Nothing secret belongs here."""

    hosts: tuple[str, ...] = ()  # user@host[:port]: uploaded in parallel, live one at a time
    user: str = "root"  # default login when a host names none
    port: int = 22  # default port when a host names none
    identity: Path | None = None  # private key file (or use ssh-agent)
    known_hosts: Path | None = None  # default ~/.ssh/known_hosts
    remote_dir: str = SEED_REMOTE_DIR  # holds releases/, the link, deploys.log, the lock
    link_name: str = "final"  # what the service loads: remote_dir/link_name
    restart_cmd: str = "systemctl restart python-services"  # seed's command
    reload_cmd: str | None = None  # if set, used instead of restart (e.g. a SIGHUP)
    health_url: str | None = None  # polled until it answers 200 (from the server itself)
    health_cmd: str | None = None  # or a command that exits 0 when healthy
    health_timeout: float = 60.0  # seconds to wait for healthy after restart
    predict_url: str | None = None  # POST {"text"} for smoke cases; default from health_url
    smoke: tuple[tuple[str, str], ...] = ()  # (text, expected label) answered by the live service
    keep_releases: int = 5  # retention; never deletes the live release or the one before it
    connect_timeout: float = 10.0  # SSH connect timeout, seconds
    command_timeout: float = 600.0  # one remote command, seconds
    min_free_factor: float = 2.0  # preflight: free space >= factor x the bytes to send
    # auto: safetensors files as a tensor delta where one applies, the rest by rsync where both
    # ends have it, else SFTP | rsync | sftp (never a tensor delta)
    transfer: str = "auto"
    bwlimit_kbps: int = 0  # cap the upload rate (rsync, tensor delta) in KiB/s (0: no cap)
    link_timeout: float = 20.0  # seconds without an answer after which the SSH link is dead
    require_health: bool = False  # refuse a deploy whose new model nothing would check
    canary: int = 0  # the first N hosts go live (health + smoke) before the rest
    canary_wait: float = 60.0  # seconds the canaries are watched (health polled) before the rest
    on_failure: str = "revert"  # revert: put switched hosts back | stop: leave them as they are
    reconnect_timeout: float = 120.0  # revert: seconds to reach a host whose link dropped
    remote_python: str = "python3"  # the server's Python (3.6 or newer) that runs ftctl's program
    health_settle: float = 10.0  # no health URL: seconds `systemctl show` must see the unit stay up

    def problems(self, where: str = "deploy") -> list[Problem]:
        out = []
        if self.keep_releases < 2:
            out.append(Problem("must be >= 2 (live + previous)", field=f"{where}.keep_releases"))
        if not 0 < self.port < 65536:
            out.append(Problem("must be a TCP port", field=f"{where}.port"))
        if not self.remote_dir.startswith("/"):
            out.append(Problem("must be an absolute path", field=f"{where}.remote_dir"))
        if "/" in self.link_name or not self.link_name:
            out.append(Problem("must be a plain name", field=f"{where}.link_name"))
        for name in ("health_timeout", "connect_timeout", "command_timeout"):
            if not getattr(self, name) > 0:
                out.append(Problem("must be > 0 (seconds)", field=f"{where}.{name}"))
        if self.min_free_factor < 0:
            out.append(Problem("must be >= 0", field=f"{where}.min_free_factor"))
        if self.transfer not in ("auto", "rsync", "sftp"):
            out.append(Problem("must be auto, rsync or sftp", field=f"{where}.transfer"))
        if self.on_failure not in ("revert", "stop"):
            out.append(Problem("must be revert or stop", field=f"{where}.on_failure"))
        if self.health_settle < 0:
            out.append(Problem("must be >= 0 (seconds)", field=f"{where}.health_settle"))
        if not self.remote_python.strip():
            out.append(Problem("must name a Python (e.g. python3)", field=f"{where}.remote_python"))
        if self.bwlimit_kbps < 0 or self.canary < 0:
            out.append(Problem("must be >= 0", field=f"{where}.bwlimit_kbps/canary"))
        if self.canary_wait < 0 or self.reconnect_timeout < 0:
            out.append(Problem("must be >= 0", field=f"{where}.canary_wait/reconnect_timeout"))
        out += self._host_problems(where)
        if not 5 <= self.link_timeout <= 50:
            out.append(Problem("must be 5..50 seconds", field=f"{where}.link_timeout"))
        if self.require_health and not (self.health_url or self.health_cmd):
            out.append(
                Problem(
                    "require_health is set but no health_url or health_cmd is configured: "
                    "nothing would check the new model",
                    field=f"{where}.require_health",
                )
            )
        return out

    def _host_problems(self, where: str) -> list[Problem]:
        """A user or host that ssh/rsync would read as an option (``-oProxyCommand=...``)."""
        out = []
        if self.user.startswith("-"):
            out.append(Problem("must not start with '-'", field=f"{where}.user"))
        for i, text in enumerate(self.hosts):
            try:
                parse_host(text, "root", 22)
            except ConfigError as exc:
                out.append(Problem(exc.message, field=f"{where}.hosts[{i}]"))
        return out


@dataclass(frozen=True)
class ServeConfig:
    """``[serve]``: the reference inference service (docs/serve.md)."""

    model_path: Path | None = None  # model directory or the deploy link
    host: str = "127.0.0.1"  # ignored when systemd passes a socket (LISTEN_FDS)
    port: int = 8000
    max_length: int = 64  # tokens per text
    device: str = "auto"  # auto | cpu | cuda; the model is moved there once, at load
    threads: int = 0  # torch CPU threads; 0 = torch's default (one per core)
    batch_size: int = 64  # most texts in one forward pass
    batch_wait_ms: float = 10.0  # longest wait of an idle model for requests it expects
    max_pending: int = 2048  # texts waiting for the model; one request more is answered 503
    max_in_flight: int = 512  # requests handled at once; one more is answered 503
    max_connections: int = 1024  # open connections or requests at once; one more is answered 503
    backlog: int = 2048  # listen backlog (the kernel caps it at net.core.somaxconn)
    max_body: int = 1 << 20  # bytes of one request body; more is answered 413
    max_texts: int = 256  # texts in one {"texts": [...]} request
    max_chars: int = 1000  # characters of one text
    header_timeout: float = 10.0  # seconds for a request's headers to arrive
    max_header_bytes: int = 16384  # a request head (request line + headers); more is answered 400
    body_timeout: float = 10.0  # seconds for a request's body to arrive (408)
    predict_timeout: float = 30.0  # seconds to wait for the model's answer (504)
    keep_alive: int = 5  # seconds an idle keep-alive connection stays open
    graceful_timeout: float = 30.0  # SIGTERM: longest wait for the requests in flight
    access_log: bool = False  # one JSON line per request on stderr
    prediction_log: str | None = None  # JSONL path; default <dir of model_dir>/logs/...; "off"
    log_texts: bool = True  # write the texts into the prediction log (false: lengths only)
    log_max_bytes: int = 10 << 20  # rotate the prediction log past this size
    log_backups: int = 5  # rotated files kept (predictions.jsonl.1 ... .N)

    def problems(self) -> list[Problem]:
        out = []
        if not 0 <= self.port < 65536:
            out.append(Problem("must be a TCP port", field="serve.port"))
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            out.append(Problem("must be auto, cpu, cuda or cuda:N", field="serve.device"))
        positive = ("max_length", "batch_size", "max_pending", "max_in_flight",
                    "max_connections", "backlog", "max_body", "max_texts", "max_chars",
                    "header_timeout", "max_header_bytes", "body_timeout", "predict_timeout",
                    "keep_alive", "graceful_timeout", "log_max_bytes")  # fmt: skip
        for name in positive:
            if not getattr(self, name) > 0:
                out.append(Problem("must be > 0", field=f"serve.{name}"))
        for name in ("threads", "batch_wait_ms", "log_backups"):
            if getattr(self, name) < 0:
                out.append(Problem("must be >= 0", field=f"serve.{name}"))
        return out


@dataclass(frozen=True)
class HarvestConfig:
    """``[harvest]``: which logged answers deserve a human look (docs/serve.md, "Harvest")."""

    log: str | None = None  # the JSONL log; default <remote_dir>/logs/predictions.jsonl
    text_field: str = "text"  # field names of a log line (a.b for nested objects) ...
    label_field: str = "label"
    score_field: str = "score"
    runner_up_field: str = "runner_up"
    runner_up_score_field: str = "runner_up_score"
    scores_field: str | None = None  # ... or one {label: probability} object instead
    time_field: str = "time"  # ISO 8601 time (for --since)
    max_score: float = 0.6  # an answer below this score is doubtful
    min_margin: float = 0.15  # ... or one this close to the runner-up
    pair_margin: float = 0.4  # ... or between a confused pair ([eval] pairs), this close
    limit: int = 200  # rows in the review file, shared out across the predicted intents

    def problems(self) -> list[Problem]:
        out = []
        for name in ("max_score", "min_margin", "pair_margin"):
            if not 0 <= getattr(self, name) <= 1:
                out.append(Problem("must be in [0, 1]", field=f"harvest.{name}"))
        if self.limit < 1:
            out.append(Problem("must be >= 1", field="harvest.limit"))
        return out
