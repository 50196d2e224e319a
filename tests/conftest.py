"""Session fixtures shared by all tests. Integration fixtures (sshd, dockerd, supervisor) live
in tests/integration/conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftctl.quiet import silence_libraries
from tests.helpers import make_tiny_model

silence_libraries()  # for the tests and every process they start (they inherit it)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random-weight 12-layer classifier over the 20 demo intents (read-only: copy it
    before changing it)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "final")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures(...)`): on a loaded
    2-core CI box, two spinning threads per process are ~10x slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
