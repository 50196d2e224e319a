"""manifest.json of a model directory: what it is made of and how it was made.

``files`` maps every file of the directory but manifest.json (POSIX relative path) to its
sha256: deploy and eval verify a directory against it with :func:`verify_manifest`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from ftctl.errors import ModelError
from ftctl.fsutil import atomic_write_text, sha256_bytes, sha256_file, sha256_tree
from ftctl.hostpaths import record_host_paths

MANIFEST = "manifest.json"
SCHEMA = 1
# the gate's verdict beside the model: written by `ftctl eval --baseline`, shipped by deploy,
# read by `ftctl promote`
EVAL_REPORT = "eval_report.json"


def write_manifest(model_dir: str | Path, payload: dict[str, Any]) -> dict[str, Any]:
    """Hash every file in ``model_dir`` into ``files``, add ``payload`` and write manifest.json
    atomically. Returns the manifest written. Inside ``--docker`` the paths in ``payload`` are
    recorded as the host paths they were mounted from (:func:`record_host_paths`)."""
    model_dir = Path(model_dir)
    payload = record_host_paths(payload)
    manifest = {"schema": SCHEMA, **payload, "files": sha256_tree(model_dir, exclude=(MANIFEST,))}
    text = json.dumps(manifest, ensure_ascii=False, indent=2, sort_keys=False, default=str)
    atomic_write_text(model_dir / MANIFEST, text + "\n")
    return manifest


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    """manifest.json of ``model_dir`` (a dict with at least ``files``), with clear errors."""
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        raise ModelError(
            f"{model_dir}: no {MANIFEST}",
            hint="only directories written by `ftctl train` or `ftctl base` carry a manifest",
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ModelError(f"{path}: no 'files' map", hint="re-create the model with ftctl train")
    return manifest


def verify_manifest(model_dir: str | Path) -> list[str]:
    """Problems of ``model_dir`` against its manifest (missing, changed or extra files);
    empty when every file matches."""
    model_dir = Path(model_dir)
    expected = read_manifest(model_dir)["files"]
    actual = sha256_tree(model_dir, exclude=(MANIFEST,))
    out = [f"{rel}: missing" for rel in expected if rel not in actual]
    out += [
        f"{rel}: sha256 differs"
        for rel, h in actual.items()
        if rel in expected and h != expected[rel]
    ]
    out += [f"{rel}: not in the manifest" for rel in actual if rel not in expected]
    return out


def model_sha256(model_dir: str | Path) -> str:
    """Identity of a model directory: sha256 of model.safetensors, else of its file tree."""
    model_dir = Path(model_dir)
    weights = model_dir / "model.safetensors"
    if weights.is_file():
        return sha256_file(weights)
    tree = sha256_tree(model_dir, exclude=(MANIFEST,))
    return sha256_bytes(json.dumps(tree, sort_keys=True).encode())


def package_versions() -> dict[str, str]:
    import torch
    import transformers

    from ftctl import __version__

    return {
        "ftctl": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def git_commit(cwd: str | Path | None = None) -> str | None:
    """HEAD of the git repository at ``cwd`` (``+dirty`` when it has changes), else None."""
    cwd = Path(cwd or os.getcwd())
    try:
        head = subprocess.run(
            ["git", "-C", str(cwd), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(cwd), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head


def tree_digest(files: dict[str, str]) -> str:
    """One sha256 over a {relpath: sha256} map (the lines sha256sum would print, sorted)."""
    lines = "".join(f"{sha}  {rel}\n" for rel, sha in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def manifest_files(model_dir: Path) -> dict[str, str] | None:
    """The manifest's ``files`` map {relpath: sha256}, or None without a manifest."""
    if not (model_dir / MANIFEST).is_file():
        return None
    files = read_manifest(model_dir)["files"]
    if not files:
        raise ModelError(f"{model_dir / MANIFEST}: empty 'files' map", hint="retrain the model")
    return {str(k): str(v) for k, v in files.items()}


def model_digest(model_dir: str | Path) -> str:
    """The content digest of a model directory (the same one deploy names releases by)."""
    model_dir = Path(model_dir)
    files = manifest_files(model_dir)
    return tree_digest(files if files is not None else sha256_tree(model_dir, exclude=(MANIFEST,)))
