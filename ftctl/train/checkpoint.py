"""OUTPUT/checkpoints/last.pt: only what ``--resume`` needs to continue exactly where it stopped.

Kept: the trainable weights (never the frozen ones), the optimizer and schedule, where the loop
stood (epochs done, optimizer steps done in the next one), every process's own running loss of
that epoch and its random generators, the best weights when they are not the current ones, the
early-stop counter and the metrics so far. Everything is loaded onto the CPU
(``map_location="cpu"``) and placed on the training device by whoever uses it; the random
generator states are plain bytes, so no ``map_location`` can move them off the CPU where
``torch.set_rng_state`` needs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftctl.errors import TrainError
from ftctl.fsutil import atomic_file

CHECKPOINT = "last.pt"
FORMAT = 3  # 1: ftctl 0.1.0 (epoch boundaries only, tensor RNG states); 2: 0.2 (one loss sum)


def trainable_state(model) -> dict[str, Any]:
    """Copies of the trainable parameters, on the CPU."""
    return {
        n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad
    }


def load_trainable(model, weights: dict[str, Any]) -> None:
    """Copy ``weights`` (any device) into the model's parameters (on theirs)."""
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


def rng_state(device: str) -> dict[str, bytes]:
    """This process's random generators as bytes: the CPU's and, on CUDA, its device's."""
    import torch

    state = {"cpu": torch.get_rng_state().numpy().tobytes()}
    if str(device).startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device).numpy().tobytes()
    return state


def set_rng_state(state: dict[str, Any], device: str) -> None:
    """Restore what :func:`rng_state` saved (bytes, or tensors on any device)."""
    import torch

    torch.set_rng_state(_byte_tensor(state["cpu"]))
    if "cuda" in state and str(device).startswith("cuda"):
        torch.cuda.set_rng_state(_byte_tensor(state["cuda"]), device)


def _byte_tensor(value) -> Any:
    import torch

    if isinstance(value, bytes | bytearray):
        return torch.frombuffer(bytearray(value), dtype=torch.uint8)
    return value.to("cpu", dtype=torch.uint8)


def save(path: Path, state: dict[str, Any]) -> None:
    import torch

    with atomic_file(path) as fh:  # straight to disk: no copy of hundreds of MB in memory
        torch.save({"format": FORMAT, **state}, fh)


def load(path: Path, fingerprint: str) -> dict[str, Any]:
    """The checkpoint at ``path`` on the CPU, checked against this run's ``fingerprint``."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise TrainError(
            f"{path}: unreadable checkpoint: {exc}",
            hint="delete OUTPUT/checkpoints/ and train again without --resume",
        ) from None
    if state.get("format") != FORMAT:
        raise TrainError(
            f"{path}: a checkpoint of an older ftctl (format {state.get('format', 1)})",
            hint="delete OUTPUT/checkpoints/ and train again without --resume",
        )
    if state.get("fingerprint") != fingerprint:
        raise TrainError(
            f"{path}: the checkpoint belongs to a run with other inputs or hyperparameters",
            hint="resume with exactly the same flags and data, or drop --resume to start over",
        )
    return state
