"""The prompt-token estimate of a request body, for rules, caps, budgets and count_tokens: counted on the event loop, or in a worker thread for large prompts and for the first load of the token table."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..routing import tokens as tok
from .state import ProxyState

log = logging.getLogger("spendwarden.proxy")

BIG_PROMPT_CHARS = 64 * 1024  # estimate larger prompts in a worker thread


def reserved_prompt(est: int) -> int:
    """The prompt tokens a request reserves for its estimate: a little more, since providers count
    with their own tokenizers and chat templates, and a reservation below the real usage could let
    concurrent requests overshoot."""
    return est + est // 10 + 4


class PromptEstimate(ProxyState):
    """Mixed into Proxy: the one estimate the pipeline and count_tokens share."""

    async def _estimate(self, api: str, body: dict[str, Any]) -> int:
        texts, fixed = tok.request_texts(api, body)
        if not texts:
            return fixed
        encoder = tok.loaded_encoder()
        loop = asyncio.get_running_loop()
        if encoder is None:
            if self._encoder_future is None:
                self._encoder_future = loop.run_in_executor(None, tok.load_encoder)
            encoder = await asyncio.shield(self._encoder_future)
        if tok.total_chars(texts) > BIG_PROMPT_CHARS:
            return await loop.run_in_executor(None, tok.estimate, encoder, texts, fixed)
        return tok.estimate(encoder, texts, fixed)
