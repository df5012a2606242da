"""The README's main job, `spendwarden demo`, runs its whole story on the test control plane, so it
cannot silently rot: real operator, real proxy, llama.cpp (or the mock where xllamacpp is missing)
and the mock premium backend; budget burnt, alerts, cut-off and its reversal, the report."""
from __future__ import annotations

from decimal import Decimal

from kubernetes import client

from spendwarden import demo


def test_the_demo_story(control_plane, kube, tmp_path):
    try:
        result = demo.run_story(str(control_plane.kubeconfig), tmp_path)
    except Exception:
        for log in sorted(tmp_path.glob("*.log")):  # what the operator and proxy said, for the failure report
            print(f"--- last lines of {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:]))
        raise
    finally:
        client.CoreV1Api(kube).delete_namespace(demo.NAMESPACE, propagation_policy="Background")
    assert result.answered["premium"] >= 4 and result.answered["local"] >= 8
    # 50% and 80%, or one Event for 80% when one status flush saw both crossed
    assert 1 <= len(result.threshold_events) <= 2
    assert any("(threshold 80%)" in m for m in result.threshold_events), result.threshold_events
    assert result.refused and "'daily' is exhausted" in result.refused
    assert result.cut_off["networkPolicy"] == "spendwarden-cut-off" and result.cut_off["localReplicas"] == 0
    assert "egress denied to 127.0.0.2/32" in result.cut_off["event"]
    assert result.lifted and result.answered_after_raise
    by_key = {(r["backend"], r["tag"]): r for r in result.report}
    assert by_key[("premium", "escalation")]["requests"] == result.answered["premium"]
    # The guarantee: reservations bound what the provider may bill (reasoning within max_tokens), the
    # last requests are clamped to what is left, and the budget ends spent but not over.
    spent = Decimal(result.spent_at_cut_off)
    assert Decimal(demo.LIMIT) * Decimal("0.9") <= spent <= Decimal(demo.LIMIT), spent
