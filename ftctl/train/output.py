"""What a run leaves: OUTPUT/final/ (a plain HF directory + manifest.json, written only when
complete), what its manifest records, and the result ``ftctl train`` / ``ftctl base`` report.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftctl.clock import utc_iso
from ftctl.config import TrainConfig
from ftctl.fsutil import atomic_dir, sha256_file
from ftctl.manifest import git_commit, package_versions, write_manifest
from ftctl.model.files import save_classifier
from ftctl.train import distributed
from ftctl.train.fit import FitResult, Setup
from ftctl.train.inputs import Inputs
from ftctl.train.layers import Built
from ftctl.train.mix import Mix

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


# ============================================================================ step 5: OUTPUT/final/


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
        "created_at": utc_iso(),
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
