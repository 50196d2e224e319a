"""The model directory to ship: which files, what each must hash to, checked before anything
is sent (relative paths that stay inside the directory, files present)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ftctl.errors import ModelError
from ftctl.fsutil import sha256_file, sha256_tree
from ftctl.manifest import EVAL_REPORT, MANIFEST, manifest_files, tree_digest
from ftctl.progress import NULL, Reporter


@dataclass(frozen=True)
class LocalModel:
    """A model directory ready to ship: what to upload and what each file must hash to."""

    path: Path
    files: dict[str, str]  # content files {relpath: sha256} (the manifest's map)
    expected: dict[str, str]  # everything uploaded, manifest.json included
    sizes: dict[str, int]
    digest: str
    has_manifest: bool

    @property
    def sha8(self) -> str:
        return self.digest[:8]

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())


def check_relpath(rel: str, where: Path) -> None:
    """A manifest path must be relative, normalised and stay inside the model directory."""
    p = PurePosixPath(rel)
    bad = (
        not rel
        or p.is_absolute()
        or rel.startswith("\\")
        or "\\" in rel
        or any(part in ("..", ".", "") for part in rel.split("/"))
        or (len(rel) > 1 and rel[1] == ":")
        or "\n" in rel
        or "\0" in rel
    )
    if bad:
        raise ModelError(
            f"{where / MANIFEST}: refusing file path {rel!r}: manifest paths must be relative "
            "and stay inside the model directory (no '..', no absolute paths)",
            hint="the manifest was edited or written by another tool; regenerate it with "
            "`ftctl train` (nothing was sent)",
        )


def load_local_model(model_dir: str | Path, reporter: Reporter = NULL) -> LocalModel:
    """Read (and check) the model directory to deploy."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ModelError(
            f"{path}: not a model directory (no config.json)",
            hint="pass the final/ directory written by `ftctl train` (--model models/.../final)",
        )
    files = manifest_files(path)
    has_manifest = files is not None
    expected = dict(files or {})
    if files is None:
        reporter.warn(f"{path} has no {MANIFEST}: computing checksums now (train writes one)")
        files = sha256_tree(path, exclude=(MANIFEST,))
        expected = dict(files)
    else:
        for rel in files:
            check_relpath(rel, path)
        root = path.resolve()
        outside = [rel for rel in files if not (path / rel).resolve().is_relative_to(root)]
        if outside:
            raise ModelError(
                f"{path}: files listed in {MANIFEST} lead outside the directory (symlinks): "
                f"{', '.join(outside)}",
                hint="copy the real files into the model directory",
            )
        missing = [rel for rel in files if not (path / rel).is_file()]
        if missing:
            raise ModelError(
                f"{path}: files listed in {MANIFEST} are missing: {', '.join(missing)}",
                hint="the directory is incomplete; copy it again or retrain",
            )
        extra = sorted(
            p.relative_to(path).as_posix()
            for p in path.rglob("*")
            if p.is_file()
            and p.relative_to(path).as_posix() not in files
            and p.name not in (MANIFEST, EVAL_REPORT)
        )
        if extra:
            reporter.warn(f"not in {MANIFEST}, not deployed: {', '.join(extra)}")
        expected[MANIFEST] = sha256_file(path / MANIFEST)
    for extra_file in (EVAL_REPORT,):  # placed beside the model by hand or by the pipeline
        if (path / extra_file).is_file() and extra_file not in expected:
            expected[extra_file] = sha256_file(path / extra_file)
    sizes = {rel: (path / rel).stat().st_size for rel in expected}
    return LocalModel(path, files, expected, sizes, tree_digest(files), has_manifest)
