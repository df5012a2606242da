"""The operator's Kubernetes client gives up on an apiserver that accepts and never answers."""
from __future__ import annotations

import socket
import threading
import time

import pytest
import urllib3
from kubernetes import client

from spendwarden.controller import kube


@pytest.fixture
def silent_server():
    """Accepts connections, reads, never writes a byte back."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
                held.append(conn)
            except OSError:
                continue

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


def _core(url: str) -> client.CoreV1Api:
    configuration = client.Configuration(host=url)
    configuration.retries = False
    return client.CoreV1Api(kube._ApiClient(configuration))


def _times_out_fast(call) -> None:
    start = time.monotonic()
    with pytest.raises(urllib3.exceptions.ReadTimeoutError):
        call()
    assert time.monotonic() - start < 5


def test_a_call_without_its_own_timeout_gets_the_default(silent_server, monkeypatch):
    monkeypatch.setattr(kube, "REQUEST_TIMEOUT", (1.0, 0.5))
    _times_out_fast(lambda: _core(silent_server).read_namespace("default"))


def test_a_call_naming_its_timeout_keeps_it(silent_server, monkeypatch):
    monkeypatch.setattr(kube, "REQUEST_TIMEOUT", (1.0, 30.0))  # would outlast the bound below
    _times_out_fast(lambda: _core(silent_server).read_namespace("default", _request_timeout=(1.0, 0.3)))
