"""The tiny GGUF writer: deterministic, small, and a llama model with a byte-fallback vocabulary."""
from __future__ import annotations

import hashlib

import pytest

from spendwarden.devtools.tiny_gguf import N_EMBD, N_LAYER, main, vocabulary, write

gguf = pytest.importorskip("gguf")


def test_deterministic_and_small(tmp_path):
    a = write(tmp_path / "a.gguf", seed=1)
    b = write(tmp_path / "b.gguf", seed=1)
    c = write(tmp_path / "c.gguf", seed=2)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(a) == digest(b) != digest(c)
    assert 200_000 < a.stat().st_size < 1_000_000


def test_metadata_and_vocabulary(tmp_path):
    r = gguf.GGUFReader(str(write(tmp_path / "m.gguf")))

    def field(name):
        f = r.fields[name]
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]]

    assert field("general.architecture") == "llama"
    assert field("tokenizer.ggml.model") == "llama"
    assert field("llama.block_count") == N_LAYER and field("llama.embedding_length") == N_EMBD
    tokens, _, types = vocabulary()
    assert len(field("tokenizer.ggml.tokens")) == len(tokens)
    # Every byte has its fallback token, so any text tokenizes.
    assert all(f"<0x{b:02X}>" in tokens for b in range(256))
    assert types.count(6) == 256
    assert {t.name for t in r.tensors} >= {"token_embd.weight", "output.weight", "blk.1.ffn_down.weight"}


def test_cli(tmp_path, capsys):
    assert main([str(tmp_path / "x.gguf"), "--seed", "3"]) == 0
    assert (tmp_path / "x.gguf").exists() and "wrote" in capsys.readouterr().out
