"""The offline simulator shares the proxy's rules (spendwarden.routing), not the proxy: it loads
neither spendwarden.proxy nor aiohttp, and never reads an API key."""
import os
import subprocess
import sys

from spendwarden.routing import model


def test_the_simulator_loads_no_proxy_module_and_no_http_library():
    code = ("import sys, spendwarden.simulate, spendwarden.simulate.replay, spendwarden.simulate.budget; "
            "print(sorted(m for m in sys.modules if m.startswith(('spendwarden.proxy', 'aiohttp'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.strip() == "[]"


def test_compiling_without_a_secret_reader_reads_no_key(monkeypatch):
    monkeypatch.setenv("SPENDWARDEN_SECRET_KEYS_OPENAI", "sk-never-read")
    from spendwarden.plainconfig import load_proxy_config

    backend = {"name": "b", "provider": "OpenAI", "url": "http://x/v1", "model": "m",
               "pricing": {"input": "1", "output": "2"},
               "credentials": {"secretRef": {"name": "keys", "key": "openai"}}}
    cfg = load_proxy_config({"namespace": "n", "routes": [
        {"name": "r", "spec": {"model": "a", "defaultBackend": "b", "backends": [backend]}}]})
    b = model.compile_config(cfg).routes["a"].default
    assert b.headers == {} and b.missing_credentials is None
    keyed = model.compile_config(cfg, secret=lambda name, key: f"{name}/{key}").routes["a"].default
    assert keyed.headers == {"Authorization": "Bearer keys/openai"}
