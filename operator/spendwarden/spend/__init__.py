"""Spending less for the same result: pure cores shared by the proxy and `spendwarden simulate`.

    scorer      request body -> complexity features -> score 0..100 -> tier (no network, < 1 ms)
    escalation  does an answer fail a check (finish_reason=length, invalid JSON, refusal, upstream
                error)? then it is retried once on the next tier
    cache       normalised request key (a hash: prompts never leave the process) + TTL/size-bounded store
    loop        the same request more than N times within a window

No I/O, no aiohttp: the proxy (proxy/spend.py) and the simulator call these with plain dicts.
"""
