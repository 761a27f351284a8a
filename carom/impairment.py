"""Emulated network impairment: what a profile says, and what it does to each packet (pure).

There is no ``tc netem`` on the machines Carom runs on (the kernel lacks the qdisc), so Carom
emulates the network itself, in user space, where a session's packets are sent: this module is
the model, with no I/O and no clock of its own. A shim in a sending path asks ``Link.admit`` what
becomes of each packet (dropped, or sent at a given time) and does the waiting.

A ``Path`` is one direction of one path (the media the simulator sends, the reports a client
sends, the results the router sends back). In the order a packet meets them:

1. **Loss.** ``loss_pct`` of the packets, independently; or, with ``burst_len``, in bursts of
   that mean length (a Gilbert-Elliott chain whose bad state loses every packet, its transition
   odds chosen so the long-run loss is still ``loss_pct``).
2. **Bandwidth.** With ``rate_kbps``, packets leave one after another at that rate, queued in
   front of the link; a packet that would wait more than ``queue_ms`` there is dropped (tail
   drop, as a router's buffer does).
3. **Delay and jitter.** ``delay_ms`` plus a draw of ``jitter_ms`` (the standard deviation of a
   normal draw, or the half-width of a uniform one), never below zero. Packets keep their order
   (a real path rarely reorders a flow): a packet never leaves before the one sent before it.
4. **Reordering.** ``reorder_pct`` of the packets are held ``reorder_gap_ms`` longer, out of the
   order above, so the packets after them overtake them.

Profiles come by name (``PROFILES``, each with its source) or whole, in YAML or JSON (custom ones
by name in the router's config: ``named``). A bad field
is refused by the decoder with its path named (``msgspec.ValidationError``: "Expected `float` <=
100.0 - at `$.media.loss_pct`").
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta

Ms = Annotated[float, Meta(ge=0, le=60_000, description="milliseconds")]
Pct = Annotated[float, Meta(ge=0, le=100, description="percent of the packets")]
Jitter = Literal["normal", "uniform"]


class Path(
    msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True, omit_defaults=True
):
    """One direction of one path: what the emulated network does to each of its packets."""

    delay_ms: Ms = 0.0
    jitter_ms: Ms = 0.0
    #: How jitter is drawn: ``normal`` (``jitter_ms`` is the standard deviation) or ``uniform``
    #: (within ``delay_ms`` ± ``jitter_ms``).
    jitter: Jitter = "normal"
    loss_pct: Pct = 0.0
    #: Mean length, in packets, of a burst of losses; None: each packet is lost independently.
    burst_len: Annotated[float, Meta(ge=1, le=10_000)] | None = None
    #: The link's rate in kilobits/s (1,000 bits); None: no limit.
    rate_kbps: Annotated[float, Meta(ge=8, le=10_000_000)] | None = None
    #: How long a packet may wait for the link before it is dropped (with ``rate_kbps``).
    queue_ms: Annotated[float, Meta(gt=0, le=60_000)] = 200.0
    reorder_pct: Pct = 0.0
    reorder_gap_ms: Annotated[float, Meta(gt=0, le=60_000)] = 20.0

    def __post_init__(self) -> None:
        if self.burst_len is not None and self.burst_len > 1 and self.loss_pct >= 100:
            raise ValueError("burst_len: a loss of 100% has no bursts; leave burst_len out")

    @property
    def is_clear(self) -> bool:
        """Nothing to do: the shim can pass packets straight through."""
        return self == CLEAR


CLEAR: Final = Path()


class Profile(
    msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True, omit_defaults=True
):
    """A session's emulated network, one ``Path`` for each of the three paths it has.

    ``media``: the RTP and RTCP the simulator sends to the client. ``reports``: the client's
    datagrams to the router. ``results``: the router's datagrams (live results) to the client.
    """

    name: Annotated[str, Meta(max_length=64)] = "custom"
    media: Path = CLEAR
    reports: Path = CLEAR
    results: Path = CLEAR

    @property
    def is_clear(self) -> bool:
        return self.media.is_clear and self.reports.is_clear and self.results.is_clear


def _both_ways(name: str, down: Path, up: Path) -> Profile:
    """A profile whose media and results take the downlink, and reports the uplink."""
    return Profile(name=name, media=down, reports=up, results=down)


#: Named profiles: figures from the sources named, one-way (half the round trip each way).
PROFILES: Final[dict[str, Profile]] = {
    "clear": Profile(name="clear"),
    # Firefox DevTools' "Regular 4G/LTE" throttle: 4 Mbps down, 3 Mbps up, 20 ms minimum
    # latency (devtools/docs/user/network_monitor/throttling); jitter and a little loss as a
    # radio link has them (Carom's choice, not the source's).
    "lte": _both_ways(
        "lte",
        Path(delay_ms=10, jitter_ms=5, loss_pct=0.5, rate_kbps=4_000),
        Path(delay_ms=10, jitter_ms=5, loss_pct=0.5, rate_kbps=3_000),
    ),
    # Firefox DevTools' "Good 3G": 1.5 Mbps down, 750 kbps up, 40 ms minimum latency.
    "3g": _both_ways(
        "3g",
        Path(delay_ms=20, jitter_ms=10, loss_pct=1, rate_kbps=1_500),
        Path(delay_ms=20, jitter_ms=10, loss_pct=1, rate_kbps=750),
    ),
    # A geostationary satellite: 35,786 km up and down again, about 270 ms one way (round trips
    # of 500-600 ms are the usual published figure), 10 Mbps down, 2 Mbps up.
    "satellite": _both_ways(
        "satellite",
        Path(delay_ms=270, jitter_ms=10, loss_pct=0.5, rate_kbps=10_000),
        Path(delay_ms=270, jitter_ms=10, loss_pct=0.5, rate_kbps=2_000),
    ),
    # A shared Wi-Fi under load (Carom's choice, no published preset): a few ms of base delay,
    # heavy jitter, bursty loss and a small share of the air.
    "wifi-congested": _both_ways(
        "wifi-congested",
        Path(delay_ms=5, jitter_ms=20, loss_pct=3, burst_len=3, rate_kbps=2_000, queue_ms=100),
        Path(delay_ms=5, jitter_ms=20, loss_pct=3, burst_len=3, rate_kbps=2_000, queue_ms=100),
    ),
}


#: What a custom profile may be called (a config's key): lower-case, digits, ``_.-``.
NAME_PATTERN: Final = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
ProfileName = Annotated[str, Meta(pattern=NAME_PATTERN)]


def named(custom: Mapping[str, Profile]) -> dict[str, Profile]:
    """Custom profiles by the names a config gives them (the router's ``networks``, in YAML):
    each takes its key as its ``name``. A built-in name is refused: one name, two networks."""
    clash = sorted(set(custom) & set(PROFILES))
    if clash:
        raise ValueError(
            f"networks: {', '.join(clash)} is a built-in profile's name; give yours another"
        )
    return {name: msgspec.structs.replace(p, name=name) for name, p in custom.items()}


def profile(spec: str | bytes | dict[str, object]) -> Profile:
    """A profile from its name, or from its fields (a mapping, or JSON text).

    Raises ``msgspec.ValidationError`` naming the bad field, or ``KeyError`` naming the known
    profiles for an unknown name.
    """
    if isinstance(spec, str) and not spec.lstrip().startswith("{"):
        try:
            return PROFILES[spec]
        except KeyError:
            raise KeyError(f"no profile {spec!r}; known: {', '.join(PROFILES)}") from None
    if isinstance(spec, dict):
        return msgspec.convert(spec, Profile)
    return msgspec.json.decode(spec, type=Profile)


Verdict = Literal["sent", "lost", "queue_full"]


@dataclass
class Counts:
    """What a link did, packet by packet: the figures a user checks the emulation against."""

    packets: int = 0
    lost: int = 0
    queue_full: int = 0
    reordered: int = 0
    delay_ms_total: float = 0.0

    @property
    def sent(self) -> int:
        return self.packets - self.lost - self.queue_full

    @property
    def mean_delay_ms(self) -> float:
        return self.delay_ms_total / self.sent if self.sent else 0.0


@dataclass
class Link:
    """One ``Path`` applied to a stream of packets; ``admit`` is called once per packet, in order.

    Times are seconds on any monotonic clock the caller chooses (the shim's loop time). The random
    draws come from ``rng``, so a seeded run is repeatable.
    """

    path: Path
    rng: random.Random = field(default_factory=random.Random)
    counts: Counts = field(default_factory=Counts)
    _bad: bool = False  # the loss chain's state
    _link_free_s: float = -math.inf  # when the rate-limited link has sent its queue
    _last_out_s: float = -math.inf  # the in-order departure of the packet before

    def admit(self, now_s: float, size: int) -> tuple[Verdict, float]:
        """What becomes of a packet of ``size`` bytes handed over at ``now_s``.

        ``("sent", t)``: it arrives at ``t`` (never before ``now_s``); otherwise it is dropped, and
        the second value is ``now_s``.
        """
        p = self.path
        self.counts.packets += 1
        if self._lose():
            self.counts.lost += 1
            return "lost", now_s
        out = now_s
        if p.rate_kbps is not None:
            start = max(now_s, self._link_free_s)
            if (start - now_s) * 1000.0 > p.queue_ms:
                self.counts.queue_full += 1
                return "queue_full", now_s
            self._link_free_s = start + size * 8 / (p.rate_kbps * 1000.0)
            out = self._link_free_s
        out += max(0.0, p.delay_ms + self._jitter_ms()) / 1000.0
        if p.reorder_pct > 0 and self.rng.random() * 100.0 < p.reorder_pct:
            self.counts.reordered += 1
            out = max(out, self._last_out_s) + p.reorder_gap_ms / 1000.0  # the next overtake it
        else:
            out = max(out, self._last_out_s)  # in order
            self._last_out_s = out
        self.counts.delay_ms_total += (out - now_s) * 1000.0
        return "sent", out

    def _lose(self) -> bool:
        p = self.path
        loss = p.loss_pct / 100.0
        if loss <= 0:
            return False
        if p.burst_len is None or loss >= 1:
            return self.rng.random() < loss
        # Gilbert-Elliott with a bad state that loses everything: leaving it has odds
        # 1/burst_len (mean burst burst_len), and entering it loss * leave / (1 - loss), so the
        # chain is in the bad state a share ``loss`` of the time.
        leave = 1.0 / p.burst_len
        enter = min(1.0, loss * leave / (1.0 - loss))
        self._bad = (self.rng.random() >= leave) if self._bad else (self.rng.random() < enter)
        return self._bad

    def _jitter_ms(self) -> float:
        p = self.path
        if p.jitter_ms <= 0:
            return 0.0
        if p.jitter == "uniform":
            return self.rng.uniform(-p.jitter_ms, p.jitter_ms)
        return self.rng.gauss(0.0, p.jitter_ms)
