"""Pure wire-format conversions between the OpenAI and Anthropic APIs (no I/O), so that one alias can
fall back from an OpenAI backend to an Anthropic one and back while the app keeps its own SDK."""
