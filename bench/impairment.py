"""The emulated network's accuracy on the wire (issue 20, item 1): 50 ms asked, 5% loss asked,
what real UDP datagrams through the services' delay line show.

Usage::

    flock /tmp/carom-heavy.lock .venv/bin/python -m bench.impairment \\
        [--packets 10000] [--rate 2000] [--seeds 1,2,3,4,5] [--results-dir bench/results]

On one event loop, as the router runs it: a sender hands ``--packets`` datagrams, ``--rate`` a
second, to a ``carom_runtime.impair.DelayLine`` whose ``deliver`` is a real UDP socket's
``sendto`` to a receiver on 127.0.0.1; each datagram carries its sequence number and the time it
was handed over (``loop.time()``), and the receiver notes its arrival time on the same clock. A
clear path is run first (the loopback and the loop's own cost), then, for each seed, the path of
``delay_ms=50, loss_pct=5``. Per run: datagrams lost (counted at the receiver, not by the
model), and the one-way time of the others, p50/p99/max, less the clear run's p50 for the
*added* figure. The goal the issue sets: 50 +/- 2 ms and 5 +/- 1% over 10,000 packets. Results:
``<results-dir>/impairment.json`` and ``impairment.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from carom.impairment import Link
from carom.impairment import Path as NetPath
from carom_runtime.impair import DelayLine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ASKED = NetPath(delay_ms=50.0, loss_pct=5.0)
_HEAD = struct.Struct("<Id")  # sequence number, time handed over (loop seconds)
SIZE = 1200  # bytes a datagram: an RTP packet's size


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.got: dict[int, float] = {}

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        seq, sent = _HEAD.unpack_from(data)
        self.got[seq] = self.loop.time() - sent


async def run(path: NetPath, packets: int, rate: float, seed: int) -> dict[str, Any]:
    """One stream of ``packets`` through ``path``; what the receiver saw."""
    loop = asyncio.get_running_loop()
    rx_transport, rx = await loop.create_datagram_endpoint(
        lambda: _Receiver(loop), local_addr=("127.0.0.1", 0)
    )
    port = rx_transport.get_extra_info("sockname")[1]
    tx_transport, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, remote_addr=("127.0.0.1", port), family=socket.AF_INET
    )
    line: DelayLine[bytes] = DelayLine(Link(path, rng=random.Random(seed)), tx_transport.sendto)
    pad = bytes(SIZE - _HEAD.size)
    t0 = loop.time()
    try:
        for i in range(packets):
            due = t0 + i / rate
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            line.push(_HEAD.pack(i, loop.time()) + pad, SIZE)
        deadline = loop.time() + path.delay_ms / 1000 + 2.0
        while loop.time() < deadline and (line.held or len(rx.got) < packets * 0.5):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # the last datagrams' way through the kernel
    finally:
        line.close()
        tx_transport.close()
        rx_transport.close()
    times = sorted(v * 1000 for v in rx.got.values())
    lost = packets - len(times)
    return {
        "seed": seed,
        "packets": packets,
        "received": len(times),
        "lost": lost,
        "lost_pct": round(100 * lost / packets, 3),
        "model_lost": line.link.counts.lost,
        "one_way_ms": {
            "p50": round(statistics.median(times), 3),
            "p99": round(times[int(len(times) * 0.99) - 1], 3),
            "max": round(times[-1], 3),
            "min": round(times[0], 3),
        },
    }


def markdown(result: dict[str, Any]) -> str:
    clear = result["clear"]["one_way_ms"]["p50"]
    lines = [
        f"# The emulated network on the wire ({result['when']})",
        "",
        f"`bench/impairment.py`: {result['packets']:,} UDP datagrams of {SIZE} bytes at "
        f"{result['rate']:g}/s through the services' delay line (`carom_runtime.impair`) to a "
        "socket on 127.0.0.1, one event loop, timed on its clock. Asked: "
        f"{ASKED.delay_ms:g} ms and {ASKED.loss_pct:g}% loss; goal 50 +/- 2 ms, 5 +/- 1%. "
        "*Added*: p50 less the clear path's p50. Lost: counted at the receiver.",
        "",
        "| run | lost | lost % | one-way p50 | added p50 | p99 | max |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in [
        ("clear", result["clear"]),
        *((f"seed {r['seed']}", r) for r in result["runs"]),
    ]:
        ow = r["one_way_ms"]
        lines.append(
            f"| {name} | {r['lost']} | {r['lost_pct']:.2f}% | {ow['p50']:.2f} ms | "
            f"{ow['p50'] - clear:+.2f} ms | {ow['p99']:.2f} ms | {ow['max']:.2f} ms |"
        )
    lines += ["", f"Machine: {result['machine']}.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=2000.0, help="datagrams a second")
    parser.add_argument("--seeds", default="1,2,3,4,5")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]

    async def all_runs() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        clear = await run(NetPath(), args.packets, args.rate, 0)
        return clear, [await run(ASKED, args.packets, args.rate, s) for s in seeds]

    clear, runs = asyncio.run(all_runs())
    from bench.e2e import machine

    result = {
        "bench": "impairment",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "packets": args.packets,
        "rate": args.rate,
        "asked": {"delay_ms": ASKED.delay_ms, "loss_pct": ASKED.loss_pct},
        "clear": clear,
        "runs": runs,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "impairment.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (args.results_dir / "impairment.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
