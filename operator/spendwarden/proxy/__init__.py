"""The data plane: the sidecar proxy (`spendwarden proxy`), also usable standalone.

Apps change only their base URL (OpenAI SDK: http://127.0.0.1:8787/v1, Anthropic SDK:
http://127.0.0.1:8787) and keep any API key (it is dropped; the backend's key is sent).

    spendwarden proxy --config PATH [--port 8787] [--host 127.0.0.1] [--metrics-port 9464]
                      [--state-file PATH] [--namespace NS] [--default-max-tokens 4096]

PATH is a ProxyConfig (JSON/YAML, what the operator renders into ConfigMap spendwarden-proxy) or
a YAML stream of ModelRoute/TokenBudget manifests; it is re-read every second and swapped in when
its content (or a referenced API key) changes; a broken edit keeps the last good configuration.

Endpoints: POST /v1/chat/completions, /v1/completions, /v1/embeddings (OpenAI), POST /v1/messages
(Anthropic), GET /v1/models (the namespace's aliases), GET /healthz; /metrics on the metrics port.
Chat requests are translated between formats both ways (OpenAI chat <-> Anthropic messages);
completions and embeddings for an Anthropic backend get a 400.

Modules:
    run        CLI entry point (add_arguments/run), uvloop, signals
    server     aiohttp app: request path, routing, fallbacks, upstream client, SSE relay, access log
    config     configuration loading (spendwarden.plainconfig, no pydantic), API keys, compilation
    budgets    local enforcement: reserve/settle per TokenBudget, periods, state file
    wire       request checks, usage extraction, SSE framing
    translate  OpenAI chat <-> Anthropic messages, requests, responses, streams and errors
    errors     errors in each provider's own shape
    metrics    Prometheus metrics (OTel GenAI names)
The pure accounting lives in spendwarden.ledger (pricing, allowance, periods); the routing rules
the simulator shares (compiled route model, rule matching, API surfaces, spend policy, prompt
estimates) in spendwarden.routing.
"""
