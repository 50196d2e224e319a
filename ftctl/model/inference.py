"""Where a model runs, and how texts go through it: the device, batched forward passes."""

from __future__ import annotations

from ftctl.errors import EnvironmentProblem


def resolve_device(device: str) -> str:
    """``auto`` -> cuda if torch sees a GPU, else cpu; ``cuda`` without a GPU is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise EnvironmentProblem(
            "--device cuda, but torch sees no CUDA GPU",
            hint="use --device cpu (or auto), or run inside the training image with --gpus",
        )
    return device
