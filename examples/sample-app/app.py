"""A support-ticket summariser: the only spendwarden-specific line is the tag header.

The injected sidecar sets OPENAI_BASE_URL to itself; the real API key lives in the proxy.
"""
import time

from openai import OpenAI

client = OpenAI(api_key="unused-the-proxy-holds-the-key")
while True:
    reply = client.chat.completions.create(
        model="chat",  # the ModelRoute alias, not a provider model
        messages=[{"role": "user", "content": "Summarise ticket 4711 in one sentence."}],
        max_tokens=100,
        extra_headers={"x-spendwarden-tags": "scenario=ticket-summary"},
    )
    print(reply.choices[0].message.content, reply.usage, flush=True)
    time.sleep(30)
