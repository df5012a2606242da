"""The routing rules the proxy enforces and the simulator replays, as one pure core (no aiohttp,
no API keys, no clock):

    apis     the API surfaces (chat, completions, embeddings, messages) and the output-cap rule
    model    the compiled route model (routes, backends, rules, budgets) from a ProxyConfig
    rules    rule matching: which backend a request goes to
    spend    a route's tiers, judge, escalation, cache and loop breaker, compiled
    tokens   the prompt-token estimate (spendwarden.tokencount; tiktoken on request)

The proxy (spendwarden.proxy) adds the I/O around them (API keys, upstream calls, metrics); the
offline simulator (spendwarden.simulate) calls them directly, so both decide alike.
"""
