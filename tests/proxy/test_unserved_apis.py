"""The SDKs' APIs the proxy does not meter are refused by name, never forwarded (issue #17),
through the official SDKs and a real proxy process."""
from __future__ import annotations

import anthropic
import openai
import pytest

from .conftest import backend, route_yaml, stream_of
from .test_translate_strict import MSG, an, oa


@pytest.fixture
def proxy(up, start_proxy):
    return start_proxy(stream_of(
        route_yaml("chat", "chat", [backend("oa", up.openai_url, "gpt-4o-mini")]),
        route_yaml("claude", "claude", [backend("an", up.url, "claude-haiku", provider="Anthropic")]),
    ))

CALLS = [
    ("images", lambda c: c.images.generate(prompt="a cat", model="dall-e-3")),
    ("audio (text to speech)", lambda c: c.audio.speech.create(model="tts-1", voice="alloy", input="hi")),
    ("moderations", lambda c: c.moderations.create(input="hi")),
    ("batches", lambda c: c.batches.create(input_file_id="file-1", endpoint="/v1/chat/completions",
                                           completion_window="24h")),
    ("files", lambda c: c.files.create(file=("a.jsonl", b"{}\n"), purpose="batch")),
    ("fine-tuning", lambda c: c.fine_tuning.jobs.create(model="gpt-4o-mini", training_file="file-1")),
    ("vector stores", lambda c: c.vector_stores.create(name="v")),
]


@pytest.mark.parametrize("name,call", CALLS, ids=[n for n, _ in CALLS])
def test_unmetered_openai_apis_are_refused_by_name_and_never_forwarded(up, proxy, name, call):
    with pytest.raises(openai.InternalServerError) as e:
        call(oa(proxy, retries=2))  # 501 with x-should-retry: false: raised at once, not retried
    assert e.value.status_code == 501
    msg = e.value.body["message"]
    assert f"OpenAI's {name} API" in msg and "does not meter" in msg and "platform team" in msg
    assert up.requests() == []
    assert e.value.response.headers["x-should-retry"] == "false"  # why the SDK raised without retrying


def test_unmetered_anthropic_apis_are_refused_by_name(up, proxy):
    with pytest.raises(anthropic.InternalServerError, match="Anthropic's Message Batches API") as e:
        an(proxy, retries=2).messages.batches.create(requests=[{"custom_id": "a", "params": {
            "model": "claude", "max_tokens": 5, "messages": MSG}}])
    assert e.value.status_code == 501 and up.requests() == []
    with pytest.raises(openai.NotFoundError, match="is not served"):  # an unknown path stays a 404
        oa(proxy).post("/nonsense", cast_to=object)
