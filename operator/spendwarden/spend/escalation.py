"""Escalation checks: does the cheap tier's answer fail, so that the request is retried once on the
next tier? Pure: the request and response bodies (in the client's wire format) in, a cause out.

Causes (also the `cause` label of spendwarden_escalations_total):
    length          the answer was cut off (finish_reason "length", Anthropic stop_reason "max_tokens")
    invalid_json    response_format asked for JSON (json_object / json_schema) and the text is not JSON
    refusal         the model refused (OpenAI message.refusal, Anthropic stop_reason "refusal", or an
                    answer that starts like a refusal: "I'm sorry, but I can't ...")
    upstream_error  the tier's backends failed (connect error, timeout, 5xx, 429) or refused the request
                    itself (400, 413: often a prompt the small model's context or API cannot take)
"""
from __future__ import annotations

import json
import re
from enum import Enum
from typing import Any


class Cause(str, Enum):
    LENGTH = "length"
    INVALID_JSON = "invalid_json"
    REFUSAL = "refusal"
    UPSTREAM_ERROR = "upstream_error"


ALL_CAUSES = frozenset(Cause)
# Upstream statuses that escalate: the retriable ones plus what a stronger tier may accept.
ESCALATING_STATUSES = frozenset((400, 408, 413, 422, 429))

_REFUSAL = re.compile(
    r"^\W*(?:i'?m sorry|i am sorry|sorry|i apologi[sz]e|unfortunately)?[,.!]?\s*(?:but\s+)?"
    r"(?:i|we)\s+(?:can(?:'|no)t|can not|am unable to|am not able to|won'?t|must decline to|will not)\s+"
    r"(?:help|assist|comply|provide|do that|fulfil|answer|complete|support|create|write|generate)",
    re.IGNORECASE)
_REFUSAL_SCAN = 240  # refusals say so in their first sentence


def wants_json(request: dict[str, Any]) -> bool:
    """Whether the request asks for a JSON answer (OpenAI response_format json_object/json_schema)."""
    rf = request.get("response_format")
    return isinstance(rf, dict) and rf.get("type") in ("json_object", "json_schema")


def looks_like_refusal(text: str | None) -> bool:
    if not text:
        return False
    return _REFUSAL.match(text[:_REFUSAL_SCAN].replace("\u2019", "'")) is not None


def _is_json(text: str | None) -> bool:
    if not text:
        return False
    t = text.strip()
    if t.startswith("```"):  # a fenced JSON block is not what response_format promises
        return False
    try:
        json.loads(t)
    except ValueError:
        return False
    return True


def upstream_status_cause(status: int) -> Cause | None:
    """The cause for an upstream error status (None: the status does not escalate, e.g. 401)."""
    return Cause.UPSTREAM_ERROR if status >= 500 or status in ESCALATING_STATUSES else None


def check_openai_chat(request: dict[str, Any], response: dict[str, Any]) -> Cause | None:
    json_wanted = wants_json(request)
    for choice in response.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        if choice.get("finish_reason") == "length":
            return Cause.LENGTH
        message = choice.get("message")
        msg = message if isinstance(message, dict) else {}
        content = msg.get("content")
        if msg.get("refusal") or (isinstance(content, str) and not msg.get("tool_calls")
                                  and looks_like_refusal(content)):
            return Cause.REFUSAL
        if json_wanted and not msg.get("tool_calls") and not _is_json(content if isinstance(content, str) else None):
            return Cause.INVALID_JSON
    return None


def check_openai_completion(request: dict[str, Any], response: dict[str, Any]) -> Cause | None:
    for choice in response.get("choices") or ():
        if isinstance(choice, dict) and choice.get("finish_reason") == "length":
            return Cause.LENGTH
    return None


def check_anthropic(request: dict[str, Any], response: dict[str, Any]) -> Cause | None:
    stop = response.get("stop_reason")
    if stop == "max_tokens":
        return Cause.LENGTH
    if stop == "refusal":
        return Cause.REFUSAL
    blocks = response.get("content") or ()
    text = next((b.get("text") for b in blocks if isinstance(b, dict) and b.get("type") == "text"), None)
    if stop != "tool_use" and looks_like_refusal(text):
        return Cause.REFUSAL
    return None


def check_response(api: str, request: dict[str, Any], response: Any) -> Cause | None:
    """The first failed check of an answer, in the client's format; api is "chat/completions",
    "completions" or "messages" (embeddings never escalate)."""
    if not isinstance(response, dict):
        return None
    if api == "chat/completions":
        return check_openai_chat(request, response)
    if api == "messages":
        return check_anthropic(request, response)
    if api == "completions":
        return check_openai_completion(request, response)
    return None


__all__ = ["Cause", "ALL_CAUSES", "ESCALATING_STATUSES", "wants_json", "looks_like_refusal",
           "upstream_status_cause", "check_response", "check_openai_chat", "check_openai_completion",
           "check_anthropic"]
