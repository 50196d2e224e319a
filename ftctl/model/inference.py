"""Where a model runs, and how texts go through it: the device, batched forward passes.

:func:`batch_probabilities` is the one loop that runs texts through a classifier; eval's
:func:`predict` (the best label of each text) and the service's predictor
(:class:`ftctl.serve.model.Predictor`, the two best) read its probabilities their own way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ftctl.errors import EnvironmentProblem


def no_cuda_gpu() -> EnvironmentProblem:
    """The error for ``--device cuda`` on a machine where torch sees no GPU."""
    return EnvironmentProblem(
        "--device cuda, but torch sees no CUDA GPU",
        hint="use --device cpu (or auto), or run inside the training image with --gpus",
    )


def resolve_device(device: str) -> str:
    """``auto`` -> cuda if torch sees a GPU, else cpu; ``cuda`` without a GPU is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise no_cuda_gpu()
    return device


def batch_probabilities(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int,
    max_length: int,
    device: Any,
    each: Callable[[list[int], Any], None],
) -> None:
    """Run ``texts`` through ``model`` (on ``device``) in length-sorted batches of at most
    ``batch_size`` (little padding per batch), under ``torch.inference_mode()``; for each batch
    call ``each(indices into texts, softmax probabilities [batch, labels] in float32)``."""
    import torch

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            enc = {k: v.to(device) for k, v in enc.items()}
            each(idx, model(**enc).logits.float().softmax(-1))


def predict(
    model,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 64,
    max_length: int = 64,
    device: str | None = None,
    *,
    advance: Callable[[int], None] | None = None,
) -> tuple[list[str], list[float]]:
    """Labels and their softmax probabilities for ``texts``, in input order.

    Batched, length-sorted (little padding per batch), under ``torch.inference_mode()``.
    ``device`` None keeps the model where it is. ``advance(n)`` is called after each batch.
    """
    if device is not None:
        model.to(device)
    target = next(model.parameters()).device
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    labels: list[str] = [""] * len(texts)
    scores: list[float] = [0.0] * len(texts)
    model.eval()

    def best(idx: list[int], probs) -> None:
        top, arg = probs.max(-1)
        for i, a, s in zip(idx, arg.tolist(), top.tolist(), strict=True):
            labels[i], scores[i] = id2label[a], s
        if advance is not None:
            advance(len(idx))

    batch_probabilities(
        model, tokenizer, texts, batch_size=batch_size, max_length=max_length, device=target,
        each=best,
    )  # fmt: skip
    return labels, scores
