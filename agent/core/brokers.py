"""A list of MQTT brokers tried in turn (the nodes of a NATS cluster's MQTT listener, or one Mosquitto): which broker
is tried next, and how long to wait before trying it. Pure: the caller owns the clock and the randomness (a uniform
draw in [0, 1) is passed in), so the agent's link (agent/io/mqtt.py) and the coordinator's (coordinator/fabric.py)
share one rule and the tests can pin it down.

The rule, for `n` brokers and `failures` failed attempts in a row (connects refused, or connections lost early):
- every failure moves on to the next broker in the list (a dead node is left at once, not retried first);
- while the current round still has brokers not yet tried, the next one is tried almost at once (HOP_S plus a
  little jitter): losing one node of a cluster costs a reconnect, not a backoff;
- once every broker of the round has failed, the wait grows by rounds: 1, 1.8, 3.2 … capped at 60 s (the
  aioesphomeapi backoff, `min(1.8**(rounds-1), 60)`), with jitter so many sites do not come back in step;
- a failure that retrying soon cannot fix (bad credentials, a refused subscription, an untrusted certificate)
  waits the maximum at once, as before.
With one broker this is exactly the single-broker backoff the link had: `min(1.8**(failures-1), 60)` + jitter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

BACKOFF_BASE = 1.8
BACKOFF_MAX_S = 60.0
HOP_S = 0.1  # to the next broker of a round: at once, but not in a hot loop
HOP_JITTER_S = 0.4  # spread of a hop: a node's sites move to the next node over less than half a second


@dataclass(frozen=True, slots=True)
class Broker:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def retry_delay_s(failures: int, brokers: int, unit: float, *, hard: bool = False) -> float:
    """Seconds to wait before the next attempt after `failures` failed ones in a row, rotating through `brokers`
    brokers; `unit` is a uniform draw in [0, 1) for the jitter; `hard`: a failure that retrying soon cannot fix."""
    if brokers < 1:
        raise ValueError(f"brokers must be at least 1, got {brokers}")
    if not 0.0 <= unit < 1.0:
        raise ValueError(f"unit must be in [0, 1), got {unit!r}")
    failures = max(failures, 1)
    if not hard and failures % brokers != 0:
        return HOP_S + unit * HOP_JITTER_S
    rounds = -(-failures // brokers)  # a hard failure mid-round counts the round as spent
    # the exponent is bounded: 1.8**64 is far past the cap, and a long outage must not overflow the float
    base = BACKOFF_MAX_S if hard else min(BACKOFF_BASE ** min(rounds - 1, 64), BACKOFF_MAX_S)
    return base + unit * (1.0 + 0.1 * base)


class Rotation:
    """The brokers in their configured order and the one in use (being tried, or connected)."""

    def __init__(self, brokers: Sequence[Broker]) -> None:
        if not brokers:
            raise ValueError("at least one broker (host, port) is needed")
        self.brokers: tuple[Broker, ...] = tuple(brokers)
        self.index = 0

    @property
    def current(self) -> Broker:
        return self.brokers[self.index]

    def __len__(self) -> int:
        return len(self.brokers)

    def advance(self) -> Broker:
        """Move on to the next broker (after the last, the first again) and return it."""
        self.index = (self.index + 1) % len(self.brokers)
        return self.current
