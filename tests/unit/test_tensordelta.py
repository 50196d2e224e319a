"""Tensor delta (issue #23, phase A): the client's encoder, the server's stdlib apply, the wire
format between them. Real safetensors files (written by the safetensors library, a real tiny
model); the server side also runs under pyenv's Python 3.6.15, alone in a temp dir."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ftctl.deploy import tensordelta as td
from ftctl.deploy.server import tensordelta as wire
from ftctl.errors import DeployError
from ftctl.fsutil import sha256_file
from tests.helpers import CHILD_RUSAGE, child_rusage, patch_safetensors

PY36 = Path("/root/.pyenv/versions/3.6.15/bin/python")
SERVER_FILE = Path(wire.__file__)


def tensors(seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "emb.weight": torch.randn(300, 64, generator=g).to(dtype),
        "layer.0.weight": torch.randn(64, 64, generator=g).to(dtype),
        "layer.0.bias": torch.randn(64, generator=g).to(dtype),
        "layer.1.weight": torch.randn(64, 64, generator=g).to(dtype),
        "head.weight": torch.randn(20, 64, generator=g).to(dtype),
    }


def nudge(t: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """What a few optimiser steps do to a tensor: every element moves a little."""
    g = torch.Generator().manual_seed(seed)
    return (t.float() + 1e-3 * torch.randn(t.shape, generator=g)).to(t.dtype)


def write(path: Path, ts: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    save_file(ts, str(path), metadata=metadata or {"format": "pt"})
    return path


def round_trip(tmp_path: Path, new: Path, basis: Path, **kw) -> td.EncodeStats:
    """Encode into memory, apply from it; the result must be ``new``, byte for byte."""
    buf = io.BytesIO()
    stats = td.encode(new, basis, buf, **kw)
    assert stats.delta_bytes == len(buf.getvalue())
    out = tmp_path / "rebuilt.safetensors"
    sha = wire.apply(io.BytesIO(buf.getvalue()), str(basis), str(out))
    assert out.read_bytes() == new.read_bytes()
    assert sha == sha256_file(new)
    return stats


@pytest.fixture
def fp32_pair(tmp_path) -> tuple[Path, Path]:
    """(new, basis): layer 1 and the head changed, the rest identical: a freeze-style fine-tune."""
    base = tensors()
    new = dict(base, **{k: nudge(base[k]) for k in ("layer.1.weight", "head.weight")})
    return write(tmp_path / "new.safetensors", new), write(tmp_path / "basis.safetensors", base)


# ------------------------------------------------------------------ round trips


def test_round_trip_fp32_references_identical_tensors_and_xors_changed_ones(tmp_path, fp32_pair):
    new, basis = fp32_pair
    stats = round_trip(tmp_path, new, basis)
    changed = (64 * 64 + 20 * 64) * 4
    assert stats.xor_bytes == changed
    assert stats.copied_bytes == (300 * 64 + 64 * 64 + 64) * 4
    assert stats.delta_bytes < changed  # the XOR planes compress (the high bytes are ~0)


def test_round_trip_bf16_uses_two_planes(tmp_path):
    base = tensors(dtype=torch.bfloat16)
    new = dict(base, **{"layer.0.weight": nudge(base["layer.0.weight"])})
    new_p = write(tmp_path / "new.safetensors", new)
    stats = round_trip(tmp_path, new_p, write(tmp_path / "basis.safetensors", base))
    assert stats.xor_bytes == 64 * 64 * 2
    assert sum(stats.planes.values()) == 2  # one X record of a bf16 tensor: 2 byte planes


def test_round_trip_changed_metadata_shifts_every_offset(tmp_path):
    """A longer header moves every tensor: references still point at the basis's offsets."""
    base = tensors()
    basis = write(tmp_path / "basis.safetensors", base)
    new = write(tmp_path / "new.safetensors", base, {"format": "pt", "note": "x" * 500})
    assert wire.header_info(str(new))["header_len"] != wire.header_info(str(basis))["header_len"]
    stats = round_trip(tmp_path, new, basis)
    assert stats.xor_bytes == 0
    assert stats.copied_bytes == sum(t.numel() * 4 for t in base.values())


def test_round_trip_identical_file_sends_almost_nothing(tmp_path):
    basis = write(tmp_path / "basis.safetensors", tensors())
    new = tmp_path / "new.safetensors"
    shutil.copyfile(basis, new)
    stats = round_trip(tmp_path, new, basis)
    assert stats.xor_bytes == 0
    assert stats.delta_bytes < 0.05 * new.stat().st_size


def test_round_trip_all_tensors_changed(tmp_path):
    base = tensors()
    new = write(tmp_path / "new.safetensors", {k: nudge(v) for k, v in base.items()})
    stats = round_trip(tmp_path, new, write(tmp_path / "basis.safetensors", base))
    assert stats.copied_bytes == 0
    assert stats.xor_bytes == sum(t.numel() * 4 for t in base.values())


def test_round_trip_tensor_of_size_zero(tmp_path):
    base = dict(tensors(), empty=torch.zeros(0, 64))
    new = dict(base, **{"head.weight": nudge(base["head.weight"])})
    round_trip(
        tmp_path,
        write(tmp_path / "new.safetensors", new),
        write(tmp_path / "basis.safetensors", base),
    )


def test_round_trip_small_blocks_mixed_within_a_tensor(tmp_path):
    """Blocks smaller than a tensor: its unchanged blocks are references, the others XOR."""
    base = tensors()
    emb = base["emb.weight"].clone()
    emb[250:] += 0.01  # only the last rows move (new tokens' embeddings, say)
    new = write(tmp_path / "new.safetensors", dict(base, **{"emb.weight": emb}))
    stats = round_trip(tmp_path, new, write(tmp_path / "basis.safetensors", base), block=4096)
    assert 0 < stats.xor_bytes < 300 * 64 * 4 // 2


@pytest.mark.parametrize("level", [0, 1, 9])
def test_round_trip_every_level(tmp_path, fp32_pair, level):
    new, basis = fp32_pair
    stats = round_trip(tmp_path, new, basis, level=level, workers=1)
    if level == 0:
        assert stats.planes["zlib"] == 0


def test_round_trip_of_a_real_model_file(tmp_path, tiny_model_dir):
    """The tiny classifier's model.safetensors, its top layers and head changed in place."""
    basis = tiny_model_dir / "model.safetensors"
    new = tmp_path / "model.safetensors"
    shutil.copyfile(basis, new)
    rng = np.random.default_rng(0)
    patch_safetensors(
        new,
        lambda name: name.startswith(("bert.encoder.layer.11.", "classifier.")),
        lambda a: a + rng.normal(0, 1e-4, a.shape).astype(a.dtype),
    )
    stats = round_trip(tmp_path, new, basis)
    assert 0 < stats.xor_bytes < stats.copied_bytes


def test_random_planes_are_stored_not_compressed(tmp_path):
    """Low mantissa bytes of an XOR are noise: stored as they are (no CPU spent, no growth)."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(512, 512, generator=g)}
    new = write(tmp_path / "new.safetensors", {"w": nudge(base["w"])})
    stats = round_trip(tmp_path, new, write(tmp_path / "basis.safetensors", base))
    assert stats.planes["stored"] >= 2  # the 2 low planes of fp32
    assert stats.delta_bytes < stats.xor_bytes


# ------------------------------------------------------------------ the server refuses


def delta_bytes(new: Path, basis: Path, **kw) -> bytes:
    buf = io.BytesIO()
    td.encode(new, basis, buf, **kw)
    return buf.getvalue()


def assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(out.name)] == []


def refused(data: bytes, basis: Path, out: Path, match: str) -> None:
    with pytest.raises(wire.DeltaError, match=match):
        wire.apply(io.BytesIO(data), str(basis), str(out))
    assert_nothing_left(out)


def test_corrupted_basis_is_an_error_and_leaves_no_file(tmp_path, fp32_pair):
    new, basis = fp32_pair
    data = delta_bytes(new, basis)
    raw = bytearray(basis.read_bytes())
    raw[-100] ^= 0x01  # one bit of the last tensor in the file flips on the server
    basis.write_bytes(bytes(raw))
    (tmp_path / "out").mkdir()
    refused(data, basis, tmp_path / "out" / "model.safetensors", "differ from the client.s copy")


def test_basis_of_another_size_is_refused_before_writing(tmp_path, fp32_pair):
    new, basis = fp32_pair
    data = delta_bytes(new, basis)
    other = tmp_path / "other.safetensors"
    other.write_bytes(basis.read_bytes() + b"\0")
    refused(data, other, tmp_path / "out.safetensors", "not the file the client chose")


@pytest.mark.parametrize("cut", [3, 20, 200, -40, -1])
def test_truncated_stream_is_an_error(tmp_path, fp32_pair, cut):
    new, basis = fp32_pair
    data = delta_bytes(new, basis)
    refused(data[:cut], basis, tmp_path / "out.safetensors", "truncated delta stream")


def payloads(data: bytes) -> list[tuple[str, int, int, int]]:
    """(record type, codec, start, end) of every payload of a delta stream, in order."""
    pos = len(wire.MAGIC) + wire.HEAD_LEN.size + wire.HEAD_LEN.unpack_from(data, 8)[0]
    out = []

    def payload(tag: str) -> None:
        nonlocal pos
        codec, n = wire.PAYLOAD.unpack_from(data, pos)
        pos += wire.PAYLOAD.size
        out.append((tag, codec, pos, pos + n))
        pos += n

    while data[pos : pos + 1] != b"E":
        tag = data[pos : pos + 1].decode()
        pos += 1
        if tag == "C":
            pos += wire.COPY.size
        elif tag == "L":
            pos += wire.LITERAL.size
            payload(tag)
        else:
            k = wire.XOR.unpack_from(data, pos)[2]
            pos += wire.XOR.size
            for _ in range(k):
                payload(tag)
    return out


def test_a_flipped_bit_in_a_stored_payload_fails_the_sha256(tmp_path, fp32_pair):
    new, basis = fp32_pair
    data = bytearray(delta_bytes(new, basis, level=0))  # every plane stored
    _, codec, start, end = [p for p in payloads(bytes(data)) if p[0] == "X"][-1]
    assert codec == wire.STORED
    data[(start + end) // 2] ^= 0x10
    refused(bytes(data), basis, tmp_path / "out.safetensors", "sha256 .* is not the client's")


def test_a_flipped_bit_in_a_compressed_payload_is_caught(tmp_path, fp32_pair):
    new, basis = fp32_pair
    data = bytearray(delta_bytes(new, basis, level=6))
    *_, start, end = [p for p in payloads(bytes(data)) if p[1] == wire.ZLIB][-1]
    data[(start + end) // 2] ^= 0x40
    refused(bytes(data), basis, tmp_path / "out.safetensors", "corrupt compressed|decodes to")


def test_wrong_sha_in_the_end_record(tmp_path, fp32_pair):
    new, basis = fp32_pair
    data = bytearray(delta_bytes(new, basis))
    data[-1] ^= 0xFF
    refused(bytes(data), basis, tmp_path / "out.safetensors", "not the client's")


def test_garbage_and_oversized_records_are_refused_without_allocating(tmp_path, fp32_pair):
    new, basis = fp32_pair
    out = tmp_path / "out.safetensors"
    refused(b"GET / HTTP/1.1\r\n\r\n" * 4, basis, out, "not a tensor delta")
    data = delta_bytes(new, basis)
    head_end = len(wire.MAGIC) + wire.HEAD_LEN.size + wire.HEAD_LEN.unpack_from(data, 8)[0]
    huge = b"L" + wire.LITERAL.pack(1 << 40)
    refused(data[:head_end] + huge, basis, out, "a literal of|past the announced size")
    huge_x = b"X" + wire.XOR.pack(0, 1 << 40, 4, 0)
    refused(data[:head_end] + huge_x, basis, out, "XOR block|past the announced")
    refused(data[:head_end] + b"Q", basis, out, "unknown record type")


def test_encode_refuses_a_basis_that_is_not_the_expected_one(tmp_path, fp32_pair):
    """The local basis must hash to the server's: if not, the end record never goes out, so
    the server applies nothing."""
    new, basis = fp32_pair
    buf = io.BytesIO()
    with pytest.raises(DeployError, match="changed"):
        td.encode(new, basis, buf, basis_sha256="0" * 64)
    refused(buf.getvalue(), basis, tmp_path / "out.safetensors", "truncated")


def test_encode_with_the_right_basis_sha(tmp_path, fp32_pair):
    new, basis = fp32_pair
    round_trip(tmp_path, new, basis, basis_sha256=sha256_file(basis))


def test_the_apply_stops_after_the_end_record(tmp_path, fp32_pair):
    """The delta is self-delimiting: bytes after it (the next framed message) stay unread."""
    new, basis = fp32_pair
    stream = io.BytesIO(delta_bytes(new, basis) + b"NEXT")
    wire.apply(stream, str(basis), str(tmp_path / "out.safetensors"))
    assert stream.read() == b"NEXT"


# ------------------------------------------------------------------ usable: the layout rule


def server_view(path: Path) -> dict:
    """What the server's probe would answer for its copy of ``path``."""
    return json.loads(json.dumps(wire.header_info(str(path))))


def test_usable_when_names_shapes_dtypes_match(tmp_path, fp32_pair):
    new, basis = fp32_pair
    assert td.usable(new, server_view(basis)) is None


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda ts: {**ts, "extra.weight": torch.zeros(2, 2)}, "not in the basis: extra.weight"),
        (lambda ts: {k: v for k, v in ts.items() if k != "head.weight"}, "not in the new file"),
        (lambda ts: {**ts, "head.weight": torch.zeros(21, 64)}, r"shape \[21, 64\] here"),
        (lambda ts: {**ts, "head.weight": ts["head.weight"].half()}, "dtype F16 here, F32"),
    ],
    ids=["added", "removed", "shape", "dtype"],
)
def test_usable_says_why_not(tmp_path, change, reason):
    base = tensors()
    basis = write(tmp_path / "basis.safetensors", base)
    new = write(tmp_path / "new.safetensors", change(base))
    assert re.search(reason, td.usable(new, server_view(basis)) or "")
    with pytest.raises(DeployError, match=reason):
        td.encode(new, basis, td.CountingSink())


def test_usable_reports_a_server_file_that_is_not_safetensors(tmp_path, fp32_pair):
    new, _ = fp32_pair
    bad = tmp_path / "pytorch_model.bin"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    assert "not a safetensors file" in td.usable(new, server_view(bad))
    assert "No such file" in td.usable(new, server_view(tmp_path / "missing"))


def test_header_info_gives_size_header_and_its_sha(tmp_path, fp32_pair):
    _, basis = fp32_pair
    info = wire.header_info(str(basis))
    raw = basis.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert info["size"] == len(raw) and info["header_len"] == n
    assert info["header"] == json.loads(raw[8 : 8 + n])
    assert info["header_sha256"] == hashlib.sha256(raw[8 : 8 + n]).hexdigest()


# ------------------------------------------------------------------ finding the local basis


def test_find_local_basis_through_the_manifest(tmp_path, fp32_pair):
    new, basis = fp32_pair
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    shutil.copyfile(basis, base_dir / "model.safetensors")
    model = tmp_path / "final"
    model.mkdir()
    shutil.copyfile(new, model / "model.safetensors")
    sha = sha256_file(basis)
    manifest = {"files": {}, "base_model": {"path": str(base_dir), "sha256": sha}}
    (model / "manifest.json").write_text(json.dumps(manifest))
    found = td.find_local_basis(model, {sha: basis.stat().st_size})
    assert found == td.LocalBasis(base_dir / "model.safetensors", sha, "base model (manifest)")
    # the server holds another file: no local basis (the deploy falls back to rsync)
    assert td.find_local_basis(model, {"f" * 64: basis.stat().st_size}) is None
    # a candidate (a cache of what was deployed) is used when the manifest's is not the one
    (base_dir / "model.safetensors").write_bytes(b"changed since")
    assert td.find_local_basis(model, {sha: basis.stat().st_size}, [basis]).how == "candidate"


def test_find_local_basis_without_manifest(tmp_path, fp32_pair):
    _, basis = fp32_pair
    sha = sha256_file(basis)
    assert td.find_local_basis(tmp_path / "nowhere", {sha: basis.stat().st_size}) is None


# ------------------------------------------------------------------ the server on Python 3.6


def run36(tmp_path: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    """The server file alone in a temp dir, run by Python 3.6.15 in isolated mode (no
    PYTHON* variables, no user site): it can import nothing but the standard library."""
    alone = tmp_path / "server36"
    alone.mkdir(exist_ok=True)
    shutil.copy(SERVER_FILE, alone / "tensordelta.py")
    return subprocess.run(
        [str(PY36), "-I", str(alone / "tensordelta.py"), *args],
        input=stdin,
        capture_output=True,
        cwd=alone,
        check=False,
    )


def test_python36_is_there_and_has_no_ftctl(tmp_path):
    out = subprocess.run([str(PY36), "-I", "-c", "import ftctl"], capture_output=True, cwd=tmp_path)
    assert out.returncode == 1 and b"No module named 'ftctl'" in out.stderr


def test_server_apply_under_python36(tmp_path, fp32_pair):
    new, basis = fp32_pair
    out = tmp_path / "out.safetensors"
    res = run36(tmp_path, "apply", str(basis), str(out), stdin=delta_bytes(new, basis, level=6))
    assert res.returncode == 0, res.stderr.decode()
    assert json.loads(res.stdout) == {"sha256": sha256_file(new), "size": new.stat().st_size}
    assert out.read_bytes() == new.read_bytes()


@pytest.mark.parametrize("version", ["3.7.16", "3.8.18", "3.9.18", "3.10.13", "3.12.1", "3.13.0"])
def test_server_apply_under_every_server_python(tmp_path, fp32_pair, version):
    """The server's python3 may be anything from 3.6 (above) to 3.13: pyenv's, isolated."""
    new, basis = fp32_pair
    python = PY36.parent.parent.parent / version / "bin" / "python"
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(SERVER_FILE, alone / "tensordelta.py")
    out = tmp_path / "out.safetensors"
    cmd = [str(python), "-I", "-W", "error", "tensordelta.py", "apply", str(basis), str(out)]
    res = subprocess.run(cmd, input=delta_bytes(new, basis), capture_output=True, cwd=alone)
    assert res.returncode == 0, res.stderr.decode()
    assert out.read_bytes() == new.read_bytes()


def test_server_apply_under_python36_bf16_and_shifted_header(tmp_path):
    base = tensors(dtype=torch.bfloat16)
    basis = write(tmp_path / "basis.safetensors", base)
    new = write(tmp_path / "new.safetensors", {k: nudge(v) for k, v in base.items()}, {"a": "b"})
    out = tmp_path / "out.safetensors"
    res = run36(tmp_path, "apply", str(basis), str(out), stdin=delta_bytes(new, basis))
    assert res.returncode == 0, res.stderr.decode()
    assert out.read_bytes() == new.read_bytes()


def test_server_apply_under_python36_refuses_a_corrupted_basis(tmp_path, fp32_pair):
    new, basis = fp32_pair
    data = delta_bytes(new, basis)
    raw = bytearray(basis.read_bytes())
    raw[-100] ^= 0x01
    basis.write_bytes(bytes(raw))
    out = tmp_path / "out.safetensors"
    res = run36(tmp_path, "apply", str(basis), str(out), stdin=data)
    assert res.returncode == 1
    assert b"tensordelta: error:" in res.stderr and b"CRC-32 mismatch" in res.stderr
    assert_nothing_left(out)


def test_server_header_under_python36(tmp_path, fp32_pair):
    _, basis = fp32_pair
    res = run36(tmp_path, "header", str(basis))
    assert res.returncode == 0
    assert json.loads(res.stdout) == server_view(basis)
    assert run36(tmp_path, "header", str(tmp_path / "missing")).returncode == 1


# ------------------------------------------------------------------ killed, stalled, memory


def start36(tmp_path: Path, basis: Path, out: Path) -> subprocess.Popen:
    alone = tmp_path / "server36"
    alone.mkdir(exist_ok=True)
    shutil.copy(SERVER_FILE, alone / "tensordelta.py")
    cmd = [str(PY36), "-I", str(alone / "tensordelta.py"), "apply", str(basis), str(out)]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE, cwd=alone)


def wait_for_part(out: Path, timeout: float = 20) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.name.startswith(out.name + ".tdelta-") for p in out.parent.iterdir()):
            return
        time.sleep(0.02)
    raise AssertionError("the apply never started writing")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGKILL"])
def test_server_apply_killed_midway_leaves_no_file_at_the_output(tmp_path, fp32_pair, sig):
    """Killed while the delta arrives: never a partial file at the output path. SIGTERM and
    SIGHUP (a dropped session) also remove the temp file; after SIGKILL it stays beside the
    output (inside the upload directory, which the next deploy removes)."""
    import signal

    new, basis = fp32_pair
    data = delta_bytes(new, basis)
    out = tmp_path / "out.safetensors"
    proc = start36(tmp_path, basis, out)
    proc.stdin.write(data[: len(data) // 2])
    proc.stdin.flush()
    wait_for_part(out)
    proc.send_signal(getattr(signal, sig))
    rc = proc.wait(20)
    proc.stdin.close()
    assert not out.exists()
    if sig == "SIGKILL":
        assert rc == -9
    else:
        assert rc == 128 + getattr(signal, sig)
        assert_nothing_left(out)


def test_encode_into_a_server_that_stops_reading_raises(tmp_path, fp32_pair):
    """The server side went away mid-stream: encode fails at once (no hang, no half success)."""
    new, basis = fp32_pair
    with subprocess.Popen(["head", "-c", "100"], stdin=subprocess.PIPE,
                          stdout=subprocess.DEVNULL) as proc:  # fmt: skip
        with pytest.raises(BrokenPipeError):
            td.encode(new, basis, proc.stdin, block=4096)
        with pytest.raises(BrokenPipeError):
            proc.stdin.close()


@pytest.mark.slow
def test_server_peak_memory_stays_under_three_largest_tensors(tmp_path):
    """The real shape's largest tensor (word embeddings, 21128 x 768 fp32 = 65 MB), all of it
    changed: the apply under Python 3.6 holds a few 4 MiB blocks, not the tensor (measured:
    ru_maxrss of the child, less the bare interpreter's)."""
    g = torch.Generator().manual_seed(0)
    base = {
        "bert.embeddings.word_embeddings.weight": torch.randn(21128, 768, generator=g),
        "bert.encoder.layer.0.intermediate.dense.weight": torch.randn(3072, 768, generator=g),
    }
    basis = write(tmp_path / "basis.safetensors", base)
    new = write(tmp_path / "new.safetensors", {k: nudge(v) for k, v in base.items()})
    delta = tmp_path / "delta"
    with open(delta, "wb") as fh:
        td.encode(new, basis, fh)
    largest = 21128 * 768 * 4
    rss = {}
    apply = [str(SERVER_FILE), "apply", str(basis), str(tmp_path / "o")]
    for what, args in (("bare", ["-c", "pass"]), ("apply", apply)):
        with open(delta, "rb") as stdin:
            cmd = [str(PY36), "-c", CHILD_RUSAGE, str(PY36), "-I", *args]
            res = subprocess.run(cmd, stdin=stdin, capture_output=True, text=True, check=True)
        rss[what] = child_rusage(res.stderr)["maxrss_kb"] * 1024
    assert (tmp_path / "o").read_bytes() == new.read_bytes()
    print(f"apply peak RSS {rss['apply'] / 1e6:.1f} MB, bare {rss['bare'] / 1e6:.1f} MB")
    assert rss["apply"] - rss["bare"] <= 3 * largest, rss


# ------------------------------------------------------------------ choosing per file


def test_choose_the_delta_with_a_local_basis_of_the_same_layout(tmp_path, fp32_pair):
    new, basis = fp32_pair
    local = td.LocalBasis(basis, sha256_file(basis), "base model (manifest)")
    method, why = td.choose(new, local)
    assert method == td.TENSOR_DELTA and "base model (manifest)" in why


def test_choose_falls_back_without_a_local_basis_or_when_the_layout_differs(tmp_path, fp32_pair):
    new, _ = fp32_pair
    method, why = td.choose(new, None)
    assert method is None and "no local copy" in why
    other = write(tmp_path / "other.safetensors", {"w": torch.zeros(2)})
    method, why = td.choose(new, None, server_view(other))
    assert method is None and "no local copy" in why and "not in the basis" in why
    local = td.LocalBasis(other, sha256_file(other), "candidate")
    assert td.choose(new, local) == (None, td.usable(new, server_view(other)))
