"""When a budget runs out at its RECENT burn rate (pure: times are passed in).

The rate is the used fraction of the budget's tightest limit per second, averaged exponentially over
time (time constant `tau`: an eighth of the period, at most 15 minutes), so a burst an hour ago
no longer drives the forecast, while one report's jitter does not either. Samples are taken at most
every `tau / 8` (the ledger offers one per report; idle proxies keep reporting, so the rate decays
when spending stops).

At period start the first sample's rate is the average since the period began (usage was zero
then); after an operator restart the persisted state continues (`to_state`), and without one the
same average since the period start is the estimate. No forecast is made before `tau / 2` of the
period has passed: a burst in its first seconds says little about the rest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MAX_TAU = 900.0   # seconds
MIN_TAU = 4.0


def time_constant(start_ts: float, end_ts: float) -> float:
    return min(max((end_ts - start_ts) / 8, MIN_TAU), MAX_TAU)


@dataclass(slots=True)
class BurnRate:
    at: float                  # unix seconds of the last sample
    fraction: float            # the used fraction then
    rate: float | None = None  # fraction per second; None before the first sample after `at`

    @classmethod
    def at_period_start(cls, start_ts: float) -> BurnRate:
        return cls(at=start_ts, fraction=0.0)

    def observe(self, now_ts: float, fraction: float, tau: float) -> bool:
        """Take a sample if the last one is at least tau/8 old; returns whether it did."""
        dt = now_ts - self.at
        if dt < tau / 8:
            return False
        # Usage only grows within a period (a reconciled dead proxy can lower it: not a negative burn).
        instant = max(fraction - self.fraction, 0.0) / dt
        if self.rate is None:
            self.rate = instant
        else:
            self.rate += (1 - math.exp(-dt / tau)) * (instant - self.rate)
        self.at, self.fraction = now_ts, fraction
        return True

    def to_state(self) -> dict[str, Any]:
        return {"at": self.at, "fraction": repr(self.fraction), **({"rate": repr(self.rate)} if self.rate is not None else {})}

    @classmethod
    def from_state(cls, data: Any, start_ts: float) -> BurnRate:
        try:
            rate = data.get("rate")
            return cls(at=float(data["at"]), fraction=float(data["fraction"]), rate=float(rate) if rate is not None else None)
        except (AttributeError, KeyError, TypeError, ValueError):
            return cls.at_period_start(start_ts)


def projected_exhaustion(burn: BurnRate, fraction: float, now_ts: float, start_ts: float, end_ts: float) -> float | None:
    """Unix time at which the budget runs out at the recent rate, if before `end_ts`; else None.
    None too when it is already spent or too early in the period to tell."""
    if fraction >= 1 or now_ts - start_ts < time_constant(start_ts, end_ts) / 2:
        return None
    rate = burn.rate
    if rate is None:  # no sample yet since the period start (or a restart): the average so far
        rate = fraction / (now_ts - start_ts)
    if rate <= 0:
        return None
    at = now_ts + (1 - fraction) / rate
    return at if at < end_ts else None
