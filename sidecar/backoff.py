"""Retry delays: exponential backoff with full jitter, shared by bot retries and webhook retries."""

from __future__ import annotations

import random


def full_jitter(attempt: int, initial: float, cap: float) -> float:
    """Delay before retry number ``attempt`` (1-based): uniform in [0, min(cap, initial·2^(attempt-1))].

    Full jitter (not equal or decorrelated) spreads a burst of failures
    evenly, so a receiver that comes back is not hit by a synchronized wave.
    """
    return random.uniform(0, min(cap, initial * 2 ** min(attempt - 1, 62)))
