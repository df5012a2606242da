"""proxy/calibration.py: an OpenAI-compatible backend's reservations follow what it bills."""
from __future__ import annotations

from spendwarden.proxy.calibration import MAX_FACTOR, PromptCalibration

KEY = ("chat", "local")


def test_a_backend_that_bills_more_than_reserved_is_reserved_more_next_time():
    c = PromptCalibration()
    assert c.scaled(KEY, 100) == 100
    c.observe(KEY, 25, 98)  # a small vocabulary: about 4x the cl100k estimate
    assert c.scaled(KEY, 30) >= 30 * 98 / 25
    assert c.scaled(("chat", "other"), 30) == 30  # per backend


def test_billing_below_the_reservation_changes_nothing_and_a_ratio_fades():
    c = PromptCalibration()
    c.observe(KEY, 100, 60)
    assert c.factor(KEY) == 1.0
    c.observe(KEY, 10, 30)
    for _ in range(400):
        c.observe(KEY, 100, 90)
    assert 1.0 <= c.factor(KEY) < 1.01  # one odd prompt does not over-reserve for ever


def test_the_factor_is_bounded_and_junk_is_ignored():
    c = PromptCalibration()
    c.observe(KEY, 1, 10**12)
    assert c.factor(KEY) == MAX_FACTOR
    c.observe(("a", "b"), 0, 5)
    c.observe(("a", "b"), 5, -1)
    assert c.factor(("a", "b")) == 1.0
