"""What the Python client keeps of the router's ``status`` messages (no network)."""

from __future__ import annotations

from carom import protocol as p
from carom_client.session import CaromSession, RouterInfo


def test_degraded_follows_the_latest_word_per_part() -> None:
    s = CaromSession(RouterInfo("https://127.0.0.1:4433/wt", b"\0" * 32), "s1")
    assert s.degraded == {}
    told = [
        p.Status(state="degraded", part="broker", detail="lost"),
        p.Status(state="degraded", part="tracker", detail="silent"),
        p.Status(state="recovered", part="broker", detail="back"),
    ]
    s.statuses.extend((1000.0 + i, st) for i, st in enumerate(told))
    assert s.degraded == {"tracker": "silent"}
