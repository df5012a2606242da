"""Warning Events survive an apiserver blip: transient answers are retried, final ones are not."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from spendwarden.controller import kube

INVOLVED = {"apiVersion": "spendwarden.io/v1alpha1", "kind": "TokenBudget", "name": "monthly", "namespace": "team-a"}


@pytest.fixture
def apiserver(monkeypatch):
    """Answers event creations with the statuses queued in `answers` (then 201), recording the bodies."""
    answers: list[int] = []
    posted: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            posted.append(body)
            status = answers.pop(0) if answers else 201
            payload = json.dumps({**body, "kind": "Event"} if status == 201 else {"kind": "Status", "code": status}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    configuration = client.Configuration(host=f"http://127.0.0.1:{server.server_address[1]}")
    shared = kube._ApiClient(configuration)
    monkeypatch.setattr(kube, "api_client", lambda: shared)
    yield answers, posted
    server.shutdown()
    server.server_close()


def test_a_transient_failure_is_retried_and_the_event_is_posted(apiserver):
    answers, posted = apiserver
    answers.extend([503, 429])
    kube.post_warning(INVOLVED, "BudgetExceeded", "budget monthly exhausted", component="ledger", backoff=0.01)
    assert len(posted) == 3 and posted[-1]["reason"] == "BudgetExceeded"
    assert posted[-1]["involvedObject"] == INVOLVED and posted[-1]["type"] == "Warning"
    assert posted[-1]["reportingComponent"] == "spendwarden.io/ledger"


def test_a_final_answer_is_not_retried_and_persistent_failures_give_up(apiserver):
    answers, posted = apiserver
    answers.append(403)
    with pytest.raises(ApiException) as err:
        kube.post_warning(INVOLVED, "CutOffLifted", "lifted", backoff=0.01)
    assert err.value.status == 403 and len(posted) == 1
    answers.extend([500, 500, 500])
    with pytest.raises(ApiException):
        kube.post_warning(INVOLVED, "CutOffLifted", "lifted", attempts=3, backoff=0.01)
    assert len(posted) == 4
