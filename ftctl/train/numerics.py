"""How the arithmetic runs on the device: the precision (fp32, or bf16 autocast with the weights
in fp32), deterministic kernels and TF32 for the duration of a run, and CUDA out-of-memory turned
into :class:`ftctl.errors.OutOfMemory` with the seed's answer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ftctl.errors import EnvironmentProblem, OutOfMemory


@dataclass(frozen=True)
class Precision:
    """How the matmuls run: ``fp32``, or ``bf16`` autocast (weights and optimizer stay fp32)."""

    name: str = "fp32"  # fp32 | bf16
    device_type: str = "cpu"  # cpu | cuda
    tf32: bool = False  # fp32 matmuls may use TF32 (CUDA, under bf16/auto only)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.name != "bf16":
            return contextlib.nullcontext()
        import torch

        return torch.autocast(self.device_type, dtype=torch.bfloat16)

    def record(self, requested: str) -> dict[str, Any]:
        return {"requested": requested, "used": self.name, "tf32": self.tf32}


FP32 = Precision()


def resolve_precision(requested: str, device: str) -> Precision:
    """``auto``: bf16 autocast on a CUDA device that supports it, fp32 elsewhere (bf16 is
    slow on CPUs without AMX). TF32 matmuls are allowed on CUDA under ``auto`` and ``bf16``;
    ``fp32`` means IEEE fp32 matmuls everywhere."""
    import torch

    kind = "cuda" if device.startswith("cuda") else "cpu"
    bf16_ok = kind == "cpu" or torch.cuda.is_bf16_supported()
    if requested == "bf16" and not bf16_ok:
        raise EnvironmentProblem(
            "--precision bf16: this GPU has no bfloat16 support",
            hint="use --precision fp32 (or auto, which picks fp32 here)",
        )
    if requested == "fp32":
        return Precision("fp32", kind, tf32=False)
    use_bf16 = requested == "bf16" or (kind == "cuda" and bf16_ok)
    return Precision("bf16" if use_bf16 else "fp32", kind, tf32=kind == "cuda")


@contextlib.contextmanager
def numerics(device: str, precision: Precision = FP32) -> Iterator[dict[str, Any]]:
    """Deterministic kernels, and TF32 only where ``precision`` allows it, for the duration
    (restored after); yields what was set (for the manifest)."""
    import torch

    cuda = device.startswith("cuda")
    if cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.get_float32_matmul_precision(),
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    if cuda:
        torch.set_float32_matmul_precision("high" if precision.tf32 else "highest")
    try:
        yield {
            "torch_deterministic_algorithms": True,
            "warn_only": True,
            "cudnn_benchmark": False,
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "torch_num_threads": torch.get_num_threads(),
        }
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]
        torch.set_float32_matmul_precision(before[3])


def is_cuda_oom(exc: BaseException) -> bool:
    """A CUDA out-of-memory error (torch's own class, or a RuntimeError with CUDA's text)."""
    import torch

    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "CUDA out of memory" in text or "CUDA error: out of memory" in text
    )


@contextlib.contextmanager
def explain_oom(where: str, position: Callable[[], tuple[int, int]] | None, cfg):
    """CUDA out-of-memory inside becomes :class:`OutOfMemory`: where it happened (``position``
    gives (batch of the epoch, optimizer steps so far)), the batch size, and the seed's
    answer (GPU 内存不足: a smaller --batch-size, more --freeze-layers), with --grad-accum to
    keep the effective batch."""
    try:
        yield
    except RuntimeError as exc:
        if not is_cuda_oom(exc):
            raise
        if position is None or cfg is None:
            raise OutOfMemory(f"GPU 内存不足 (CUDA out of memory) while {where}") from exc
        k, step = position()
        raise OutOfMemory.at_step(
            where, batch=k + 1, step=step + 1, batch_size=cfg.batch_size,
            grad_accum=cfg.grad_accum,
        ) from exc  # fmt: skip
