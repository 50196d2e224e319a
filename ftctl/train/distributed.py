"""One training over several processes (``ftctl train --nproc N``): torchrun launches them, and
the training steps find their rank and world size in the environment torchrun sets.

:func:`launch` is the launcher behind ``--nproc/--nnodes/--rdzv-endpoint`` (the same as running
``torchrun ... -m ftctl train ...``). Inside each process :func:`session` joins the process
group (gloo on CPU, nccl on CUDA: one GPU per process) and yields a :class:`World`: its rank,
and the few host-side collectives the loop needs (sums of metrics, one decision broadcast from
rank 0, "does any process want to stop"), run over a gloo group so that they never wait on a GPU
queue. A run without torchrun's environment is a world of one and uses none of this.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ftctl.errors import ConfigError, EnvironmentProblem

RDZV_ID = "ftctl-train"  # one job per rendezvous endpoint at a time
GRACE_ENV = "FTCTL_STOP_GRACE"  # seconds the processes get to stop (set by --docker's runner)
DEFAULT_GRACE = 60  # as [image] stop_grace: torchrun's own default would be 30


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one training run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    group: Any = None  # the gloo process group for host-side collectives (None: world of one)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that reports and writes files."""
        return self.rank == 0

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over all processes (float64)."""
        if self.size == 1:
            return [float(v) for v in values]
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every process if it is true on one."""
        return self.sum([1.0 if flag else 0.0])[0] > 0

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every process."""
        if self.size == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order, on every process."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier(group=self.group)


SINGLE = World()


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) outside torchrun."""
    try:
        return (
            int(os.environ.get("RANK", "0")),
            int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")),
        )
    except ValueError:
        raise EnvironmentProblem(
            "RANK / WORLD_SIZE / LOCAL_RANK are not integers",
            hint="start several processes with --nproc (or torchrun), not by setting these",
        ) from None


def in_worker() -> bool:
    """Is this process one of several started by torchrun?"""
    return env_world()[1] > 1


def device_for(device: str, local_rank: int) -> str:
    """This process's device: ``cuda`` becomes ``cuda:<local rank>`` (one GPU per process)."""
    return f"cuda:{local_rank}" if device == "cuda" else device


@contextlib.contextmanager
def session(device: str) -> Iterator[tuple[World, str]]:
    """Join the process group torchrun prepared, if any; yields (world, this process's
    device) and leaves the group at the end. Outside torchrun: (SINGLE, device)."""
    rank, size, local_rank = env_world()
    if size == 1:
        yield SINGLE, device
        return
    import torch
    import torch.distributed as dist

    mine = device_for(device, local_rank)
    if mine.startswith("cuda"):
        if local_rank >= torch.cuda.device_count():
            raise EnvironmentProblem(
                f"process {rank} wants GPU {local_rank}, but torch sees "
                f"{torch.cuda.device_count()} GPU(s)",
                hint="use --nproc no larger than the number of GPUs (or --device cpu)",
            )
        torch.cuda.set_device(local_rank)
    owner = not dist.is_initialized()
    if owner:
        dist.init_process_group(backend="nccl" if mine.startswith("cuda") else "gloo")
    group = dist.new_group(backend="gloo") if mine.startswith("cuda") else dist.group.WORLD
    try:
        yield World(rank=rank, size=size, local_rank=local_rank, group=group), mine
    finally:
        if owner:
            dist.destroy_process_group()


def wrap_ddp(module, world: World, device: str):
    """``module`` in DistributedDataParallel (gradients averaged over the processes)."""
    if world.size == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [world.local_rank] if device.startswith("cuda") else None
    return DistributedDataParallel(module, device_ids=ids, gradient_as_bucket_view=True)


# ------------------------------------------------------------------ the launcher


def check_launch(nproc: int, nnodes: int, rdzv_endpoint: str | None, device: str) -> None:
    """Refuse what torchrun would fail on later, with a hint."""
    if nnodes > 1 and not rdzv_endpoint:
        raise ConfigError(
            f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT",
            hint="run the same command on every machine with --rdzv-endpoint "
            "FIRST_MACHINE:29400 (a free port on a machine all of them reach)",
        )
    if device in ("cuda", "auto"):
        import torch

        n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n_gpus and nproc > n_gpus:
            raise ConfigError(
                f"--nproc {nproc}: this machine has {n_gpus} GPU(s), one per process",
                hint=f"use --nproc {n_gpus} or fewer (or --device cpu)",
            )
        if device == "cuda" and not n_gpus:
            from ftctl.model.inference import no_cuda_gpu

            raise no_cuda_gpu()


def torchrun_args(
    argv: Sequence[str], *, nproc: int, nnodes: int, rdzv_endpoint: str | None
) -> list[str]:
    """The ``torchrun`` command line that runs ``ftctl ARGV`` in every process (also what
    a user may type to launch it by hand)."""
    opts = ["--nproc-per-node", str(nproc), "--nnodes", str(nnodes), "--max-restarts", "0"]
    if rdzv_endpoint:
        opts += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint]
        opts += ["--rdzv-id", RDZV_ID]
    else:
        opts.append("--standalone")  # one machine: a free local port, no endpoint to name
    return [*opts, "-m", "ftctl", *argv]


def stop_grace(environ: dict[str, str] | None = None) -> int:
    """Seconds the processes get between a stop signal and SIGKILL: ``$FTCTL_STOP_GRACE``
    (what ``--docker`` gives the container: [image] stop_grace) or DEFAULT_GRACE."""
    raw = (os.environ if environ is None else environ).get(GRACE_ENV, "")
    try:
        return max(1, round(float(raw)))
    except ValueError:
        return DEFAULT_GRACE


def give_workers(args, grace: int) -> None:
    """torchrun forwards a stop signal to its processes and SIGKILLs them ``grace`` seconds
    later (its own default: 30). torch >= 2.12 has ``--shutdown-timeout``; before, the 30 s
    are the default of ``PContext.close``, given here as ``grace`` instead."""
    if hasattr(args, "shutdown_timeout"):
        args.shutdown_timeout = grace
        return
    import functools

    from torch.distributed.elastic.multiprocessing import api

    close = getattr(api.PContext.close, "__wrapped__", api.PContext.close)

    @functools.wraps(close)
    def close_with_grace(self, death_sig=None, timeout: int = grace):
        return close(self, death_sig, timeout)

    api.PContext.close = close_with_grace


def launch(
    argv: Sequence[str],
    *,
    nproc: int,
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
    debug: bool = False,
) -> int:
    """Run ``ftctl ARGV`` in ``nproc`` processes on this machine (of ``nnodes`` machines)
    through torch.distributed.run; returns the exit code to leave with: 0, the first failed
    process's own code (it printed its error), or 130 when interrupted (the processes got the
    signal, wrote their checkpoint and said how to resume). On a stop signal the processes
    get :func:`stop_grace` seconds before torchrun kills them: under ``--docker`` the same as
    ftctl gives the container."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if not debug:  # the processes report their own errors; torchrun's report is a traceback
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("torch.distributed"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    # the machine's cores shared out (torchrun would say so in a warning, and pick 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    words = torchrun_args([], nproc=nproc, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint)
    args = get_args_parser().parse_args(words)
    args.training_script_args = list(argv)  # not parsed by torchrun: --nproc is ambiguous there
    give_workers(args, stop_grace())
    try:
        run(args)
    except SignalException:
        return 130
    except ChildFailedError as exc:
        failures = sorted(exc.failures.items())
        code = failures[0][1].exitcode if failures else 1
        return code if code > 0 else 128 - code  # killed by signal N: 128 + N, as a shell says
    return 0
