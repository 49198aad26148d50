"""Limits that keep the service answering under load: per-client rate limits and a bounded request queue.

- `RateLimit.parse("60/min")` and `TokenBuckets`: one token bucket per client (API key or address), refilled at
  the limit's rate and holding up to one period's worth, so a client may burst the whole allowance and then
  continues at the steady rate. At most `max_clients` buckets are kept; the least recently seen is dropped
  first, and as a dropped bucket has usually refilled in the meantime, dropping it forgives little.
- `Admission`: at most `limit` model requests in the service at once (being uploaded, decoded, waiting for a
  batch or in a forward pass); the next is refused at once, before its body is read, instead of queueing
  without bound.
"""

from __future__ import annotations

import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from hierax.errors import HieraxError

MAX_CLIENTS = 10_000
_PERIODS = {"s": 1.0, "sec": 1.0, "second": 1.0, "min": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}
_RATE = re.compile(r"^\s*(\d+)\s*(?:/\s*([a-z]+))?\s*$")


@dataclass(frozen=True)
class RateLimit:
    """`requests` per `period` seconds."""

    requests: int
    period: float = 60.0

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        """ "60/min", "5/s", "1000/hour" or a bare "60" (per minute); HieraxError for anything else."""
        match = _RATE.match(text.lower())
        if not match or (match.group(2) and match.group(2) not in _PERIODS):
            raise HieraxError(f"--rate-limit '{text}' is not a rate: write it as N/min (or N/s, N/hour)")
        requests = int(match.group(1))
        if requests < 1:
            raise HieraxError(f"--rate-limit must allow at least 1 request, got '{text}'")
        return cls(requests, _PERIODS[match.group(2) or "min"])

    @property
    def per_second(self) -> float:
        return self.requests / self.period

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "min", 3600.0: "hour"}.get(self.period, f"{self.period:g}s")
        return f"{self.requests}/{unit}"


class TokenBuckets:
    """Token buckets per client for `limit` (see the module docstring); `clock` is monotonic seconds."""

    def __init__(
        self, limit: RateLimit, *, max_clients: int = MAX_CLIENTS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_clients < 1:
            raise ValueError(f"max_clients must be at least 1, got {max_clients}")
        self.limit = limit
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, last refill)

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, client: str) -> float:
        """Spend one of `client`'s tokens: 0.0 when it had one, else the seconds until it will have one."""
        now = self.clock()
        capacity, rate = float(self.limit.requests), self.limit.per_second
        tokens, last = self._buckets.pop(client, (capacity, now))
        tokens = min(capacity, tokens + (now - last) * rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / rate
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait


class Admission:
    """At most `limit` requests inside at once (None: no limit); `depth` is how many are inside now."""

    def __init__(self, limit: int | None) -> None:
        if limit is not None and limit < 1:
            raise HieraxError(f"--max-queue must be at least 1, got {limit}")
        self.limit = limit
        self.depth = 0
        self.refused = 0

    def try_enter(self) -> bool:
        """Count one request in, or refuse it (False) when `limit` are inside."""
        if self.limit is not None and self.depth >= self.limit:
            self.refused += 1
            return False
        self.depth += 1
        return True

    def leave(self) -> None:
        self.depth = max(0, self.depth - 1)


def retry_after(seconds: float) -> str:
    """A Retry-After header value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
