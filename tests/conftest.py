"""Shared fixtures: the shared data folder (skip when absent) and tiny random checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """``<repo>/../shared/data`` (CI and developers), or ``$AQUILACHAT_SHARED_DATA``."""
    for candidate in (os.environ.get("AQUILACHAT_SHARED_DATA"), REPO.parent / "shared" / "data",
                      Path("/work/shared/data")):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data is not present")
    return path


@pytest.fixture(scope="session")
def aquila_tokenizer_dir(shared_data) -> Path:
    path = shared_data / "tokenizers" / "aquila"
    if not (path / "vocab.json").exists():
        pytest.skip("Aquila tokenizer files are not present")
    return path


@pytest.fixture(scope="session")
def byte_tokenizer_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE tokenizer (256 bytes + a few merges + Aquila-style specials), no shared data needed."""
    from tests.helpers import make_byte_tokenizer
    out = tmp_path_factory.mktemp("byte_tok")
    make_byte_tokenizer(out)
    return out


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_torch_thread():
    """Two shared cores: one intra-op thread is many times faster than two competing ones
    (training tests, several processes at once). Use with ``pytest.mark.usefixtures``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session", autouse=True)
def cpu_decode_kernels():
    """Build the CPU decode backend's kernel (aquilachat.backends.cpu_kernels) once, before any
    test: on a fresh machine the first build takes about a minute, and doing it here keeps that
    time and its one-time notice out of tests that time or read a subprocess's stderr."""
    from aquilachat.backends import cpu_kernels
    cpu_kernels.load()
