"""Reading traffic logs for `spendwarden simulate`: the proxy's own JSON access log and batch JSONL.

Three line shapes are recognised, per line (a file may mix them):

- the proxy's access log (`proxy/access_log.py`, one JSON object per request, with "ts", "api" and
  "outcome"): no prompt (prompts are never logged), but the billed usage, the prompt estimate, the
  backend and tier that served it, the scenario tags, the complexity score (and the judge's
  verdict), the escalation ({"from", "to", "cause"}) and the cache ("hit" with what it "saved");
- OpenAI batch input: {"custom_id", "method", "url", "body"} with url /v1/chat/completions,
  /v1/completions, /v1/embeddings (or /v1/messages);
- Anthropic message batches: {"custom_id", "params"}.

Batch lines have the full request, so the policy's scorer and cache key see what the proxy would.
A batch body's `metadata` (an OpenAI request field of string values) may carry what a batch file
otherwise lacks: `ts` (RFC 3339 arrival time), `scenario` (or any other tag), `output_tokens`
(the answer's length) and `outcome` (what a cheaper tier's answer did, see outcomes.py).
Pure: parsing only, no tokenizer, no clock.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from ..routing.apis import CHAT, COMPLETIONS, EMBEDDINGS, MESSAGES, RESPONSES

ACCESS_LOG = "access-log"
OPENAI_BATCH = "openai-batch"
ANTHROPIC_BATCH = "anthropic-batch"

_BATCH_APIS = {
    "/v1/chat/completions": CHAT, "/chat/completions": CHAT,
    "/v1/completions": COMPLETIONS, "/completions": COMPLETIONS,
    "/v1/embeddings": EMBEDDINGS, "/embeddings": EMBEDDINGS,
    "/v1/messages": MESSAGES, "/messages": MESSAGES,
    "/v1/responses": RESPONSES, "/responses": RESPONSES,
}
_LOG_APIS = frozenset((CHAT, COMPLETIONS, EMBEDDINGS, MESSAGES, RESPONSES))
_MONEY = re.compile(r"^[0-9]+(\.[0-9]+)?$")


class TrafficError(ValueError):
    """A line that cannot be read; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class Recorded:
    """What a log recorded about how a request was actually served (None: not recorded)."""

    backend: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_input_tokens: int | None = None
    cache_write_tokens: int | None = None     # Anthropic prompt-cache writes (billed above input)
    cache_write_1h_tokens: int | None = None  # the 1-hour-TTL part of them
    est_prompt_tokens: int | None = None
    max_output_tokens: int | None = None
    status: int | None = None
    outcome: str | None = None  # the access log's outcome (ok, upstream_error, ...) or a batch hint
    score: float | None = None  # the proxy's complexity score, when logged
    tier: str | None = None
    escalated_from: str | None = None
    escalation_cause: str | None = None
    cache_hit: bool | None = None
    cache_key: str | None = None
    saved: Decimal | None = None  # a logged cache hit: what the cached answer had cost


@dataclass(frozen=True, slots=True)
class TrafficRequest:
    """One request of the log, in the order read."""

    index: int
    line: int
    source: str  # ACCESS_LOG, OPENAI_BATCH or ANTHROPIC_BATCH
    api: str
    alias: str | None
    ts: datetime | None
    body: dict[str, Any] | None = None  # None for access-log lines: prompts are never logged
    tags: dict[str, str] = field(default_factory=dict)
    request_id: str | None = None
    recorded: Recorded = field(default_factory=Recorded)

    @property
    def scenario(self) -> str:
        return self.tags.get("scenario", "-")


def _int(value: Any) -> int | None:
    return value if type(value) is int and value >= 0 else None


def _float(value: Any) -> float | None:
    return float(value) if type(value) in (int, float) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def parse_time(value: Any, where: str) -> datetime | None:
    """An aware UTC datetime from Unix seconds or RFC 3339; None when absent."""
    if value is None:
        return None
    if type(value) in (int, float):
        return datetime.fromtimestamp(value, tz=UTC)
    if isinstance(value, str):
        try:
            t = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise TrafficError(f"{where}: time {value!r} is neither Unix seconds nor RFC 3339") from None
        if t.tzinfo is None:
            raise TrafficError(f"{where}: time {value!r} has no UTC offset (write e.g. 2026-01-05T09:00:00Z)")
        return t.astimezone(UTC)
    raise TrafficError(f"{where}: time must be a number or a string, got {type(value).__name__}")


def _tags(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items() if isinstance(v, (str, int, float))}


def url_api(url: Any) -> str | None:
    """The API of a batch line's url (None: not one the proxy serves)."""
    return _BATCH_APIS.get(url.split("?")[0]) if isinstance(url, str) else None


def _access_line(obj: dict[str, Any], index: int, line: int, where: str) -> TrafficRequest:
    api = obj.get("api")
    if api not in _LOG_APIS:
        raise TrafficError(f"{where}: access log line with unknown api {api!r}")
    escalated = obj.get("escalated")
    esc = escalated if isinstance(escalated, dict) else {}
    # The tier was picked on the judge's verdict when there was one, else on the local score.
    score = _float(obj.get("judge_score"))
    if score is None:
        score = _float(obj.get("complexity_score"))
    saved = obj.get("saved")
    rec = Recorded(
        backend=_str(obj.get("backend")), input_tokens=_int(obj.get("input_tokens")),
        output_tokens=_int(obj.get("output_tokens")), cached_input_tokens=_int(obj.get("cached_input_tokens")),
        cache_write_tokens=_int(obj.get("cache_write_tokens")),
        cache_write_1h_tokens=_int(obj.get("cache_write_1h_tokens")),
        est_prompt_tokens=_int(obj.get("est_prompt_tokens")), max_output_tokens=_int(obj.get("max_output_tokens")),
        status=_int(obj.get("status")), outcome=_str(obj.get("outcome")), score=score, tier=_str(obj.get("tier")),
        escalated_from=_str(esc.get("from")), escalation_cause=_str(esc.get("cause")),
        cache_hit=obj.get("cache") == "hit" or obj.get("outcome") == "cache_hit",
        cache_key=_str(obj.get("cache_key")),
        saved=Decimal(saved) if isinstance(saved, str) and _MONEY.match(saved) else None)
    return TrafficRequest(index=index, line=line, source=ACCESS_LOG, api=api, alias=_str(obj.get("model")),
                          ts=parse_time(obj.get("ts"), where), tags=_tags(obj.get("tags")), recorded=rec)


def _batch_line(obj: dict[str, Any], index: int, line: int, where: str) -> TrafficRequest:
    api: str | None
    if "params" in obj:
        source, api, body = ANTHROPIC_BATCH, MESSAGES, obj.get("params")
    else:
        source = OPENAI_BATCH
        url = obj.get("url")
        method = obj.get("method", "POST")
        if method != "POST":
            raise TrafficError(f"{where}: batch method must be POST, got {method!r}")
        api = url_api(url)
        if api is None:
            raise TrafficError(f"{where}: batch url {url!r} is not one of /v1/chat/completions, /v1/completions, "
                               f"/v1/embeddings, /v1/messages")
        body = obj.get("body")
    if not isinstance(body, dict):
        raise TrafficError(f"{where}: the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise TrafficError(f"{where}: the request body has no 'model'")
    metadata = body.get("metadata")
    meta = metadata if isinstance(metadata, dict) else {}
    tags = _tags({k: v for k, v in meta.items() if k not in ("ts", "output_tokens", "outcome")})
    out = meta.get("output_tokens")
    if isinstance(out, str) and out.isdigit():
        out = int(out)
    rec = Recorded(output_tokens=_int(out), outcome=_str(meta.get("outcome")))
    rid = obj.get("custom_id")
    return TrafficRequest(index=index, line=line, source=source, api=api, alias=model,
                          ts=parse_time(meta.get("ts"), where), body=body, tags=tags,
                          request_id=str(rid) if rid is not None else None, recorded=rec)


def parse_line(text: str, index: int, line: int, name: str = "<traffic>") -> TrafficRequest | None:
    """One request, or None for a blank line."""
    text = text.strip()
    if not text:
        return None
    where = f"{name}:{line}"
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise TrafficError(f"{where}: not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise TrafficError(f"{where}: expected a JSON object per line")
    if "body" in obj or "params" in obj:
        return _batch_line(obj, index, line, where)
    if "api" in obj and "ts" in obj:
        return _access_line(obj, index, line, where)
    raise TrafficError(f"{where}: neither a proxy access-log line (ts, api, ...) nor a batch request "
                       f"(custom_id, method, url, body)")


def read_lines(lines: Iterable[str], name: str = "<traffic>") -> list[TrafficRequest]:
    out: list[TrafficRequest] = []
    for n, text in enumerate(lines, start=1):
        req = parse_line(text, len(out), n, name)
        if req is not None:
            out.append(req)
    return out


def read_traffic(path: str) -> list[TrafficRequest]:
    try:
        with open(path, encoding="utf-8") as f:
            return read_lines(f, path)
    except OSError as exc:
        raise TrafficError(f"cannot read traffic log {path}: {exc.strerror or exc}") from None
