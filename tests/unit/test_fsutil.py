"""Atomic writes and hashing (ftctl.fsutil): a failed write never leaves half a file."""

from __future__ import annotations

import hashlib
import os

import pytest
from typer.testing import CliRunner

from ftctl import fsutil
from ftctl.cli.main import app
from ftctl.data.examples import Example, write_examples
from ftctl.fsutil import atomic_dir, atomic_write_bytes, atomic_write_text, sha256_file, sha256_tree

runner = CliRunner()


def boom(*args, **kwargs):
    raise OSError("disk full (simulated)")


def test_atomic_write_replaces_the_file(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    atomic_write_text(path, "旧")
    atomic_write_text(path, "新")
    assert path.read_text(encoding="utf-8") == "新"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.txt"]
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "f.jsonl"
    atomic_write_bytes(path, b"old\n")
    monkeypatch.setattr(fsutil.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, b"new\n")
    assert path.read_bytes() == b"old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f.jsonl"]


def test_failed_write_of_a_new_file_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(fsutil.os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(tmp_path / "new.txt", "x")
    assert list(tmp_path.iterdir()) == []


def test_write_examples_is_atomic(tmp_path, monkeypatch):
    path = write_examples(tmp_path / "d.csv", [Example("帮我打卡", "CLOCK_IN")])
    before = path.read_bytes()
    monkeypatch.setattr(fsutil.os, "replace", boom)
    with pytest.raises(OSError):
        write_examples(path, [Example("今天到了多少人", "ATTENDANCE_TODAY")])
    assert path.read_bytes() == before


def test_generate_command_failure_keeps_old_outputs(tmp_path, monkeypatch):
    samples = tmp_path / "s.yaml"
    samples.write_text("intents:\n  CLOCK_IN: [帮我打卡, 我要签到]\n", encoding="utf-8")
    out = tmp_path / "incremental_training_data.jsonl"
    out.write_text("previous\n", encoding="utf-8")
    monkeypatch.setattr(fsutil.os, "replace", boom)
    result = runner.invoke(
        app, ["data", "generate", "--templates", str(samples), "--out-dir", str(tmp_path),
              "--per-intent", "2", "--format", "jsonl"],
    )  # fmt: skip
    assert result.exit_code != 0
    assert out.read_text(encoding="utf-8") == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name, "s.yaml"]


def test_atomic_dir_appears_only_when_complete(tmp_path):
    final = tmp_path / "final"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("interrupted")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
    assert (final / "a").read_text() == "1"


def test_atomic_dir_overwrite(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    (final / "old").write_text("x")
    with pytest.raises(FileExistsError), atomic_dir(final):
        pass
    with atomic_dir(final, overwrite=True) as tmp:
        (tmp / "new").write_text("y")
    assert [p.name for p in final.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_sha256_file_and_tree(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b.txt").write_bytes(b"b")
    (tmp_path / "a.txt").write_bytes(b"a")
    assert sha256_file(tmp_path / "a.txt") == hashlib.sha256(b"a").hexdigest()
    tree = sha256_tree(tmp_path, exclude=("a.txt",))
    assert tree == {"d/b.txt": hashlib.sha256(b"b").hexdigest()}
    assert os.sep not in "".join(tree) or os.sep == "/"


@pytest.mark.parametrize(("mask", "fmode", "dmode"), [(0o022, "0o644", "0o755"),
                                                       (0o077, "0o600", "0o700"),
                                                       (0o002, "0o664", "0o775")])  # fmt: skip
def test_modes_are_what_the_umask_allows(tmp_path, mask, fmode, dmode):
    old = os.umask(mask)
    try:
        assert fsutil.umask() == mask
        path = atomic_write_text(tmp_path / "f.txt", "x")
        assert oct(path.stat().st_mode & 0o777) == fmode
        final = tmp_path / "final"
        with atomic_dir(final) as tmp:
            assert oct(tmp.stat().st_mode & 0o777) == "0o700"  # mkdtemp's, while being built
            (tmp / "sub").mkdir()
            secret = tmp / "sub" / "model.safetensors"
            secret.write_bytes(b"w")
            os.chmod(secret, 0o600)  # what safetensors leaves behind
        assert oct(final.stat().st_mode & 0o777) == dmode
        assert oct((final / "sub").stat().st_mode & 0o777) == dmode
        assert oct((final / "sub" / "model.safetensors").stat().st_mode & 0o777) == fmode
    finally:
        os.umask(old)
