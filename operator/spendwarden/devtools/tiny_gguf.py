"""Write a tiny random-weight llama GGUF model that llama.cpp loads in well under a second.

The text it generates is gibberish, but tokenization and usage accounting are real: the vocabulary is
a SentencePiece-style ("llama" tokenizer model) byte-fallback vocabulary, so every UTF-8 byte of a
prompt maps to one `<0xNN>` token unless a short piece (a few common ASCII words) matches first.

    python -m spendwarden.devtools.tiny_gguf OUT.gguf [--seed N]

The file is deterministic for a given seed (same bytes every time), about 0.5 MB.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_FF = 128
N_CTX_TRAIN = 2048

# Token types as llama.cpp's llama_token_type enum numbers them.
_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6

# A handful of pieces so that tokenization is not purely one token per byte (closer to a real
# SentencePiece vocabulary); "▁" marks a leading space. SPM merges pairs of adjacent symbols only if
# the pair is itself a piece, so every longer piece needs its prefixes ("▁t", "▁th" for "▁the").
_PIECES = ["▁", "e", "t", "h", "o", "a", "s", "i", "n", "▁t", "▁th", "▁the", "▁a", "▁i", "▁is",
           "in", "er", "he", "▁h", "▁he", "ll", "▁hell", "▁hello"]

# ChatML, so that /v1/chat/completions works without relying on llama.cpp's built-in fallback.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and types: 3 specials, 256 byte tokens, the pieces, the ChatML markers."""
    tokens = ["<unk>", "<s>", "</s>"]
    scores = [0.0, 0.0, 0.0]
    types = [_UNKNOWN, _CONTROL, _CONTROL]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        scores.append(0.0)
        types.append(_BYTE)
    for i, piece in enumerate(_PIECES):
        tokens.append(piece)
        scores.append(-float(i + 1))  # SPM merges prefer higher scores; any fixed order is fine
        types.append(_NORMAL)
    for marker in ("<|im_start|>", "<|im_end|>"):
        tokens.append(marker)
        scores.append(0.0)
        types.append(_CONTROL)
    return tokens, scores, types


def write(path: str | Path, seed: int = 0) -> Path:
    """Write the model to `path` and return it."""
    import gguf  # only the test/demo extra needs it

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens, scores, types = vocabulary()
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:
        # Small weights keep activations finite through the random layers.
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("spendwarden-tiny")
    w.add_context_length(N_CTX_TRAIN)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    w.add_tensor("token_embd.weight", rand(n_vocab, N_EMBD))
    for i in range(N_LAYER):
        p = f"blk.{i}"
        w.add_tensor(f"{p}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        w.add_tensor(f"{p}.attn_q.weight", rand(N_EMBD, N_EMBD))
        w.add_tensor(f"{p}.attn_k.weight", rand(N_EMBD, N_EMBD))
        w.add_tensor(f"{p}.attn_v.weight", rand(N_EMBD, N_EMBD))
        w.add_tensor(f"{p}.attn_output.weight", rand(N_EMBD, N_EMBD))
        w.add_tensor(f"{p}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        w.add_tensor(f"{p}.ffn_gate.weight", rand(N_FF, N_EMBD))
        w.add_tensor(f"{p}.ffn_up.weight", rand(N_FF, N_EMBD))
        w.add_tensor(f"{p}.ffn_down.weight", rand(N_EMBD, N_FF))
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    w.add_tensor("output.weight", rand(n_vocab, N_EMBD))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spendwarden.devtools.tiny_gguf", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="Path of the .gguf file to write.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights (default 0).")
    args = parser.parse_args(argv)
    out = write(args.out, seed=args.seed)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
