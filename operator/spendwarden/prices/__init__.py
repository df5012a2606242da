"""Where a backend's prices come from: its own `pricing`, else the cluster's pinned prices, else the
genai-prices catalog (OpenAI and Anthropic models), field by field.

The operator resolves them when it renders a namespace's proxy configuration, so the sidecars always
receive explicit prices and never import the catalog (resolve.py is pure; catalog.py is the only
module that imports genai-prices, and only when a price is looked up: by the operator, the CLI, or a
standalone proxy reading manifests).
"""
