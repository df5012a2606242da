"""How much more prompt an OpenAI-compatible backend bills than the proxy estimated.

The estimate counts cl100k tokens, close to what OpenAI and Anthropic bill. An in-cluster
OpenAI-compatible server runs a model whose tokenizer the proxy does not know, and a small or
SentencePiece vocabulary can count several times more: the demo's tiny llama.cpp model bills
about 4x. A reservation below the bill lets a budget be overshot by what it missed. So each such
backend learns its ratio from the usage it reports (billed prompt / reserved prompt, when above 1),
and later reservations are scaled by it. A ratio seen once fades by 2% per request, so that one
unusual prompt does not over-reserve for ever. Bounded: one entry per backend of the
configuration, at most MAX_BACKENDS.
"""
from __future__ import annotations

import math

MAX_BACKENDS = 1024
MAX_FACTOR = 16.0
FADE = 0.98


class PromptCalibration:
    def __init__(self) -> None:
        self._factors: dict[tuple[str, str], float] = {}

    def factor(self, key: tuple[str, str]) -> float:
        return self._factors.get(key, 1.0)

    def scaled(self, key: tuple[str, str], reserved: int) -> int:
        f = self._factors.get(key)
        return reserved if f is None else math.ceil(reserved * f)

    def observe(self, key: tuple[str, str], reserved: int, billed: int) -> None:
        """One request's reserved prompt (before scaling) and the prompt its backend billed."""
        if reserved <= 0 or billed < 0:
            return
        seen = min(billed / reserved, MAX_FACTOR)
        old = self._factors.get(key, 1.0)
        new = max(seen, 1.0 + (old - 1.0) * FADE)
        if new <= 1.0:
            self._factors.pop(key, None)
        elif key in self._factors or len(self._factors) < MAX_BACKENDS:
            self._factors[key] = new


__all__ = ["PromptCalibration", "MAX_FACTOR"]
