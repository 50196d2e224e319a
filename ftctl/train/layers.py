"""The classifier as training holds it: the encoder's layers, the frozen prefix (embeddings +
the first N layers), the head grown for new labels, and the forward pass split in two (the
frozen prefix once per text, the trainable top every step). :func:`build_model` is step 2 of
a fine-tune: the model loaded in fp32, its head grown, its prefix frozen.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ftctl.config import TrainConfig
from ftctl.errors import ConfigError, ModelError
from ftctl.model.files import TRAIN_DTYPE, load_classifier

if TYPE_CHECKING:  # build_model's argument (inputs.py reads the data with features.py)
    from ftctl.train.inputs import Inputs

# --------------------------------------------------------------------------- structure


def base_module(model):
    """The encoder stack of a BERT-family classifier (``model.bert`` / ``model.roberta``)."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if base is None or not hasattr(base, "embeddings") or not hasattr(base, "encoder"):
        raise ModelError(
            f"{type(model).__name__} is not a BERT-family classifier (no embeddings/encoder)",
            hint="ftctl fine-tunes BERT-family classifiers (bert, roberta)",
        )
    return base


def layer_count(model) -> int:
    """Number of transformer layers in the encoder."""
    return len(base_module(model).encoder.layer)


def frozen_modules(model, n_layers: int) -> list:
    """The modules ``freeze`` freezes: embeddings + the first ``n_layers`` layers (none for 0)."""
    if n_layers <= 0:
        return []
    base = base_module(model)
    return [base.embeddings, *base.encoder.layer[:n_layers]]


def frozen_param_names(model, n_layers: int) -> list[str]:
    """state_dict names of every parameter that ``freeze`` freezes, in model order."""
    ids = {id(p) for m in frozen_modules(model, n_layers) for p in m.parameters()}
    return [name for name, p in model.named_parameters() if id(p) in ids]


def freeze(model, n_layers: int) -> list[str]:
    """Freeze the embeddings and the first ``n_layers`` encoder layers (``0`` freezes nothing).

    The frozen modules are put in eval mode (no dropout), so their output for a text is fixed and
    can be cached. Returns the frozen parameter names. ``n_layers`` above the model's layer
    count is an error.
    """
    total = layer_count(model)
    if n_layers > total:
        raise ConfigError(
            f"--freeze-layers {n_layers}: the model has only {total} encoder layers",
            hint=f"use --freeze-layers between 0 and {total} (the seed's 8 is for 12-layer models)",
        )
    if n_layers < 0:
        raise ConfigError(f"--freeze-layers {n_layers}: must be >= 0")
    for module in frozen_modules(model, n_layers):
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
    return frozen_param_names(model, n_layers)


def grow_head(model, labels: Sequence[str]) -> list[str]:
    """Append ``labels`` the classifier lacks as new output rows; old rows are kept exactly.

    Updates config id2label/label2id/num_labels. Returns the labels added (in order).
    """
    import torch

    old = [model.config.id2label[i] for i in range(model.config.num_labels)]
    new = [lab for lab in dict.fromkeys(labels) if lab not in old]
    if not new:
        return []
    head = _final_linear(model)
    n_old, n_all = head.out_features, head.out_features + len(new)
    grown = torch.nn.Linear(head.in_features, n_all, bias=head.bias is not None)
    grown.to(device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        std = getattr(model.config, "initializer_range", 0.02)
        torch.nn.init.normal_(grown.weight, std=std)
        grown.weight[:n_old] = head.weight
        if head.bias is not None:
            grown.bias.zero_()
            grown.bias[:n_old] = head.bias
    _set_final_linear(model, grown)
    every = [*old, *new]
    model.config.num_labels = n_all
    model.config.id2label = dict(enumerate(every))
    model.config.label2id = {lab: i for i, lab in enumerate(every)}
    if hasattr(model, "num_labels"):
        model.num_labels = n_all
    return new


def _final_linear(model):
    head = model.classifier
    return head.out_proj if hasattr(head, "out_proj") else head  # roberta: a small MLP head


def _set_final_linear(model, linear) -> None:
    if hasattr(model.classifier, "out_proj"):
        model.classifier.out_proj = linear
    else:
        model.classifier = linear


# --------------------------------------------------------------------------- split forward


def additive_mask(attention_mask, dtype):
    """[B, L] 0/1 mask -> [B, 1, 1, L] additive float mask (eager and sdpa attention accept it)."""
    import torch

    ext = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - ext) * torch.finfo(dtype).min


def run_layers(model, hidden, attention_mask, start: int, stop: int | None = None):
    """Run encoder layers ``[start:stop]`` on ``hidden`` ([B, L, H]); mask [B, L] or None."""
    layers = base_module(model).encoder.layer
    ext = None if attention_mask is None else additive_mask(attention_mask, hidden.dtype)
    for layer in layers[start:stop]:
        out = layer(hidden, attention_mask=ext)
        hidden = out[0] if isinstance(out, tuple) else out  # transformers 4 returns a tuple
    return hidden


def prefix_forward(model, input_ids, n_layers: int, attention_mask=None):
    """Embeddings + the first ``n_layers`` layers: the frozen part's output ([B, L, H])."""
    base = base_module(model)
    hidden = base.embeddings(input_ids=input_ids)
    return run_layers(model, hidden, attention_mask, 0, n_layers)


def cls_only_supported(model) -> bool:
    """The last layer can be run for the [CLS] position alone (absolute positions, encoder)."""
    cfg = model.config
    return (
        getattr(cfg, "position_embedding_type", "absolute") == "absolute"
        and not getattr(cfg, "is_decoder", False)
        and cfg._attn_implementation in ("eager", "sdpa")
    )


def cls_layer_forward(layer, hidden, attention_mask):
    """A BERT layer's output at position 0 only ([B, 1, H]): what the pooler/head read.

    Keys and values still come from every position; the query, the attention output and the
    feed-forward run for one token instead of L (~5/6 of the layer's work saved). Same math as
    the full layer's row 0."""
    import torch.nn.functional as F

    att = layer.attention.self
    b, length, _ = hidden.shape
    nh, hd = att.num_attention_heads, att.attention_head_size
    cls = hidden[:, :1]
    q = att.query(cls).view(b, 1, nh, hd).transpose(1, 2)
    k = att.key(hidden).view(b, length, nh, hd).transpose(1, 2)
    v = att.value(hidden).view(b, length, nh, hd).transpose(1, 2)
    mask = None if attention_mask is None else additive_mask(attention_mask, hidden.dtype)
    ctx = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=att.dropout.p if layer.training else 0.0
    )
    ctx = ctx.transpose(1, 2).reshape(b, 1, nh * hd)
    attended = layer.attention.output(ctx, cls)  # dense, dropout, LayerNorm(x + cls)
    return layer.output(layer.intermediate(attended), attended)


def head_forward(model, hidden, attention_mask, start: int, cls_only: bool = False):
    """Layers ``[start:]`` + pooler + classifier on a prefix output: the logits ([B, labels]).

    ``cls_only`` runs the last layer for the [CLS] position alone (see cls_layer_forward)."""
    n = layer_count(model)
    if cls_only and start < n and cls_only_supported(model):
        hidden = run_layers(model, hidden, attention_mask, start, n - 1)
        hidden = cls_layer_forward(base_module(model).encoder.layer[n - 1], hidden, attention_mask)
    else:
        hidden = run_layers(model, hidden, attention_mask, start)
    if model.config.model_type == "roberta":
        return model.classifier(hidden)
    base = base_module(model)
    pooled = base.pooler(hidden) if base.pooler is not None else hidden[:, 0]
    return model.classifier(model.dropout(pooled))


# --------------------------------------------------------------------------- step 2 of a fine-tune


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
