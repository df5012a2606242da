"""tests/e2e skips with a reason that names what is missing (docker, kind, kubectl)."""
from __future__ import annotations

import os

from tests.e2e.conftest import missing_prerequisites


def test_the_skip_reason_names_the_missing_tools(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    reason = missing_prerequisites()
    assert reason is not None and "not found: docker, kind, kubectl" in reason
    assert "CI runs the local control-plane suite" in reason
    fake = tmp_path / "kind"
    fake.write_text("#!/bin/sh\nexit 0\n")
    os.chmod(fake, 0o755)
    assert "not found: docker, kubectl" in missing_prerequisites()
