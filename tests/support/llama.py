"""The llama.cpp test upstream lives in the package (the demo uses it too): re-exported here."""
from spendwarden.devtools.llama_server import DEFAULT_ALIAS, LlamaServer, xllamacpp_available

__all__ = ["DEFAULT_ALIAS", "LlamaServer", "xllamacpp_available"]
