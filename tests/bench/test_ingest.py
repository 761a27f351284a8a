"""bench/ingest.py's pure parts: its routes file, its per-type messages, the router CSV rows it
reads and its markdown. No timing is asserted."""

from __future__ import annotations

import math
from pathlib import Path

from bench import ingest
from carom import channels as ch


def test_the_bench_routes_are_valid_take_every_offered_rate_and_allow_its_datagrams() -> None:
    tree = ingest._routes("tag1", {"chat", "microphone"})
    routes = ch.parse_routes(tree, "bench routes")
    assert set(routes.routes) == set(ingest.TYPES)
    for name, route in routes.routes.items():
        assert route.max_rate >= 5_000 and route.bucket_burst >= 5_000, name
        assert route.datagrams == (name in ("chat", "microphone")), name
        assert "tag1" in route.topic
        # Every typical message fits its route and passes its format's check.
        fmt, size, meta = ingest.TYPES[name]
        payload = b"x" * size
        frame = ch.decode_frame(ch.encode_frame(name, 0, 1.7e12, payload, meta))
        ch.check_format(fmt, frame)
        assert len(payload) + 200 <= route.max_message_bytes
        # The smallest ones fit a datagram.
        if route.datagrams:
            assert len(ch.encode_frame(name, 2**40, math.nan, payload, meta)) < 1_100


def test_router_rows_are_the_types_within_the_window(tmp_path: Path) -> None:
    path = tmp_path / "router-channels.csv"
    path.write_text(
        "time,type,messages_per_s,bytes_per_s,queue_depth,publish_p50_ms,publish_p99_ms,"
        "refused,failed\n"
        "100.0,chat,10,800,0,1.5,3.0,0,0\n"
        "101.0,camera,10,800,0,1.5,3.0,0,0\n"
        "105.0,chat,10,800,0,2.5,9.0,1,0\n"
        "120.0,chat,10,800,0,2.5,9.0,0,0\n"
    )
    rows = ingest._router_rows(path, "chat", 99.0, 104.0)
    assert [r["time"] for r in rows] == ["100.0", "105.0"]  # 1.5 s past the window's end
    assert ingest._router_rows(tmp_path / "none.csv", "chat", 0, 1) == []


def test_markdown_has_a_row_per_step_and_names_what_never_left() -> None:
    s = ingest.Step("microphone", "datagram", 5000.0, 5.0, 160, sent=25_000, received=16_422,
                    lost=8_578, not_sent=8_578)  # fmt: skip
    meta = {"when": "now", "machine": "m", "pulsar": "4.0.7", "command": "c", "seconds": 5.0}
    text = ingest._markdown([ingest.Step("chat", "stream", 100.0, 5.0, 80), s], meta)
    assert text.count("| chat | 80 | stream | 100 |") == 1
    assert "| microphone | 160 | datagram | 5000 |" in text
    assert "8578 datagrams never left the client" in text
