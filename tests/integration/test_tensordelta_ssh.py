"""Tensor delta over a real sshd (issue #23, phase A): the client's encoder streams into
`ssh ... python3.6 tensordelta.py apply`, as the deploy will; the basis's header is asked of
the server the same way. The server file runs alone under pyenv's Python 3.6.15."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ftctl.deploy import tensordelta as td
from ftctl.deploy.server import tensordelta as wire
from ftctl.fsutil import sha256_file
from tests.helpers import patch_safetensors

pytestmark = pytest.mark.integration

PY36 = "/root/.pyenv/versions/3.6.15/bin/python"


@pytest.fixture
def server(tmp_path, sshd_server, tiny_model_dir):
    """(ssh command prefix, server dir holding the basis and the server file, new file)."""
    srv = tmp_path / "srv"
    (srv / ".ftctl").mkdir(parents=True)
    shutil.copy(wire.__file__, srv / ".ftctl" / "tensordelta.py")
    shutil.copy(tiny_model_dir / "model.safetensors", srv / "model.safetensors")
    new = tmp_path / "final" / "model.safetensors"
    new.parent.mkdir()
    shutil.copy(tiny_model_dir / "model.safetensors", new)
    rng = np.random.default_rng(0)
    patch_safetensors(
        new,
        lambda name: name.startswith(("bert.encoder.layer.10.", "bert.encoder.layer.11.")),
        lambda a: a + rng.normal(0, 1e-4, a.shape).astype(a.dtype),
    )
    s = sshd_server
    ssh = ["ssh", "-p", str(s.port), "-i", str(s.client_key), "-o", "BatchMode=yes",
           "-o", f"UserKnownHostsFile={s.known_hosts}", "-o", "StrictHostKeyChecking=yes",
           f"{s.user}@{s.address}"]  # fmt: skip
    return ssh, srv, new


def remote(srv: Path, *args: str) -> str:
    return " ".join([PY36, "-I", str(srv / ".ftctl" / "tensordelta.py"), *args])


def stream(ssh: list[str], command: str, new: Path, basis: Path) -> subprocess.CompletedProcess:
    with subprocess.Popen([*ssh, command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc:  # fmt: skip
        td.encode(new, basis, proc.stdin)
        proc.stdin.close()
        out, err = proc.stdout.read(), proc.stderr.read()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_round_trip_over_ssh_is_byte_identical(server):
    ssh, srv, new = server
    basis = srv / "model.safetensors"  # the client's copy is the same bytes (same machine)
    info = json.loads(subprocess.run([*ssh, remote(srv, "header", str(basis))],
                                     capture_output=True, check=True).stdout)  # fmt: skip
    assert td.usable(new, info) is None
    out = srv / "incoming" / "model.safetensors"
    out.parent.mkdir()
    res = stream(ssh, remote(srv, "apply", str(basis), str(out)), new, basis)
    assert res.returncode == 0, res.stderr.decode()
    assert json.loads(res.stdout)["sha256"] == sha256_file(new)
    assert out.read_bytes() == new.read_bytes()


def test_corrupted_basis_on_the_server_fails_and_writes_nothing(server, tmp_path):
    ssh, srv, new = server
    local_basis = tmp_path / "local-basis.safetensors"  # the client's good copy
    shutil.copy(srv / "model.safetensors", local_basis)
    raw = bytearray((srv / "model.safetensors").read_bytes())
    raw[len(raw) // 3] ^= 0x04  # the server's copy rots after it was indexed
    (srv / "model.safetensors").write_bytes(bytes(raw))
    out = srv / "incoming" / "model.safetensors"
    out.parent.mkdir()
    res = stream(ssh, remote(srv, "apply", str(srv / "model.safetensors"), str(out)), new,
                 local_basis)  # fmt: skip
    assert res.returncode == 1
    assert b"CRC-32 mismatch" in res.stderr
    assert list(out.parent.iterdir()) == []


def test_shapes_differ_on_the_server_the_probe_says_why(server):
    """The server's file has another head (21 labels, the new model 20): `usable`, from the
    header the server sent, names the tensor, so the deploy sends this file by rsync."""
    import torch
    from safetensors.torch import load_file, save_file

    ssh, srv, new = server
    tensors = load_file(str(srv / "model.safetensors"))
    tensors["classifier.weight"] = torch.zeros(21, tensors["classifier.weight"].shape[1])
    tensors["classifier.bias"] = torch.zeros(21)
    other = srv / "other.safetensors"
    save_file(tensors, str(other))
    info = json.loads(subprocess.run([*ssh, remote(srv, "header", str(other))],
                                     capture_output=True, check=True).stdout)  # fmt: skip
    assert td.usable(new, info) == ("tensor 'classifier.bias': shape [20] here, [21] in the basis")
