"""The APIs the SDKs call that the proxy does not meter, recognised by path, so that a refusal
names the endpoint and what to do instead of a bare 404 (issue #17: never forwarded unmetered).

They are answered 501 Not Implemented in the client's error shape with `x-should-retry: false`:
the SDKs raise at once (openai.InternalServerError / anthropic.InternalServerError, the message
intact) instead of retrying a 5xx that will never succeed.
"""
from __future__ import annotations

# Path prefix -> what it is. Longer prefixes first where one contains another.
_OPENAI = (
    ("/v1/audio/speech", "audio (text to speech)"),
    ("/v1/audio/transcriptions", "audio (transcriptions)"),
    ("/v1/audio/translations", "audio (translations)"),
    ("/v1/audio", "audio"),
    ("/v1/images", "images"),
    ("/v1/files", "files"),
    ("/v1/uploads", "uploads (files)"),
    ("/v1/batches", "batches"),
    ("/v1/fine_tuning", "fine-tuning"),
    ("/v1/fine-tunes", "fine-tuning"),
    ("/v1/vector_stores", "vector stores"),
    ("/v1/moderations", "moderations"),
    ("/v1/realtime", "realtime"),
    ("/v1/assistants", "assistants"),
    ("/v1/threads", "assistants (threads and runs)"),
    ("/v1/evals", "evals"),
    ("/v1/containers", "containers"),
    ("/v1/videos", "videos"),
    ("/v1/conversations", "conversations"),
    ("/v1/chatkit", "ChatKit"),
    ("/v1/organization", "administration"),
    ("/v1/engines", "engines (deprecated)"),
    ("/v1/edits", "edits (deprecated)"),
)
_ANTHROPIC = (
    ("/v1/messages/batches", "Message Batches"),
    ("/v1/files", "Files"),
    ("/v1/skills", "Skills"),
    ("/v1/organizations", "Admin"),
)

STATUS = 501
HEADERS = {"x-should-retry": "false"}


def _segment_prefix(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def endpoint_of(path: str, anthropic: bool) -> str | None:
    """The name of the API at `path` when it is one the proxy knows but does not serve."""
    for prefix, name in (_ANTHROPIC if anthropic else ()) + _OPENAI:
        if _segment_prefix(path, prefix):
            return name
    return None


def message(method: str, path: str, name: str, provider: str) -> str:
    return (f"{method} {path} is {provider}'s {name} API, which the spendwarden proxy does not meter, so it "
            f"refuses it rather than forward it unmetered: ask your platform team to serve it (see the README, "
            f"\"The proxy (data plane)\": what is served, metered and refused), and do not call the provider "
            f"directly around the proxy")
