"""pytest fixtures for upstreams: the mock upstream and a real llama.cpp server.

Enabled with `pytest_plugins = ["tests.support.fixtures"]` in tests/conftest.py.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from spendwarden.devtools.mock_upstream import MockUpstream

from .llama import LlamaServer, xllamacpp_available


@pytest.fixture
def mock_upstream() -> Iterator[MockUpstream]:
    """A fresh mock upstream per test (starting one takes milliseconds)."""
    with MockUpstream() as up:
        yield up


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of the tiny random-weight llama GGUF model (written once per session)."""
    from spendwarden.devtools.tiny_gguf import write

    return write(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="session")
def llama_server(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """A llama.cpp OpenAI-compatible server on the tiny model, shared by the session.

    `.openai_url` (base URL with /v1), `.url`, `.model` (the served model name). Two slots, 512
    context tokens each, one thread. Skips the test when xllamacpp is not installed.
    """
    if not xllamacpp_available():
        pytest.skip("xllamacpp is not installed")
    with LlamaServer(tiny_gguf, workdir=tmp_path_factory.mktemp("llama")) as server:
        yield server
