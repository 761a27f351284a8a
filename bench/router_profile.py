"""Sum a py-spy raw (collapsed) profile of the router by stage of its ingest path.

Usage: ``.venv/bin/python bench/router_profile.py PROFILE.raw [--rate 100 --seconds 10]``

Each sample is charged to the stage of its innermost frame that a rule below names (leaf first),
so a sample inside aioquic's packet decryption called from the asyncio loop counts as
decryption, not as the loop. ``--rate`` and ``--seconds`` (as recorded) give the share of the
wall time the sampled threads held the GIL (with ``py-spy --gil``).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

#: (stage, pattern on one frame "function (file:line)"), tried on each frame from the leaf up.
RULES: list[tuple[str, str]] = [
    ("Pulsar: send_async (hand-off to the C++ client)", r"(^|\.)send_async \(.*pulsar/__init__"),
    ("Pulsar: ack callback (Publisher._callback)", r"(^|\.)_callback \(.*pulsar_io"),
    (
        "Pulsar: Publisher.publish/_send (lock, sequence ids)",
        r"(^|\.)(publish|_send) \(.*pulsar_io",
    ),
    ("Carom: rate limit (TokenBucket)", r"(^|\.)allow \(.*carom/protocol"),
    ("Carom: report decode + checks", r"(^|\.)decode_report \(.*carom/protocol"),
    ("Carom: clock conversion", r"\(.*carom/protocol.*\)$"),
    ("Carom: Centroid build + validation (schemas)", r"\(.*carom/schemas"),
    ("Carom: restamp + encode (Router.publish)", r"(^|\.)publish \(.*carom_router/router"),
    ("Carom: session core (SessionCore.datagram)", r"\(.*carom_router/session"),
    ("Carom: Link (act, datagram)", r"\(.*carom_router/link"),
    ("Carom: WebTransport glue (events, deliver)", r"\(.*carom_router/webtransport"),
    ("QUIC: packet decryption", r"(^|\.)(decrypt_packet|_decrypt|decrypt) \(.*aioquic/quic/crypto"),
    (
        "QUIC: packet encryption (ACKs out)",
        r"(^|\.)(encrypt_packet|encrypt) \(.*aioquic/quic/crypto",
    ),
    ("QUIC: crypto other", r"\(.*aioquic/quic/crypto"),
    ("QUIC: packet building (ACKs, datagrams_to_send)", r"\(.*aioquic/quic/packet_builder"),
    ("QUIC: header parsing", r"\(.*aioquic/quic/packet\.py"),
    ("QUIC: recovery / congestion", r"\(.*aioquic/quic/(recovery|congestion)"),
    ("QUIC: ACK ranges", r"\(.*aioquic/quic/rangeset"),
    ("QUIC: connection (frames, events, timers)", r"\(.*aioquic/quic/"),
    ("HTTP/3: datagram and stream events", r"\(.*aioquic/h3/"),
    ("aioquic asyncio glue (protocol, server)", r"\(.*aioquic/asyncio/"),
    ("asyncio event loop (selector, handles)", r"\(.*(asyncio|selectors)"),
    ("Pulsar: Publisher's own thread (_run, _connected)", r"\(.*pulsar_io"),
    ("Pulsar: other client calls", r"\(.*pulsar/__init__"),
    ("threads: waits and locks (Publisher's thread, errors reader)", r"\(threading\.py"),
    ("logging", r"\(.*logging/"),
]


def stage_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for stage, pattern in RULES:
            if re.search(pattern, frame):
                return stage
    return "other: " + (frames[-1] if frames else "?")


def summarize(path: Path) -> tuple[int, Counter[str], Counter[str]]:
    """Total samples, samples per stage (leaf first), and inclusive samples of key frames."""
    stages: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    keys = {
        "Link.datagram (Carom's whole per-report path)": r"(^|\.)datagram \(.*carom_router/link",
        "SessionCore.datagram": r"(^|\.)datagram \(.*carom_router/session",
        "Router.publish (incl. Publisher)": r"(^|\.)publish \(.*carom_router/router",
        "QuicConnection.receive_datagram": r"(^|\.)receive_datagram \(.*aioquic/quic/connection",
        "QuicConnectionProtocol.transmit (ACKs out)": r"(^|\.)transmit \(.*",
        "Publisher._callback (on the Pulsar I/O thread)": r"(^|\.)_callback \(.*pulsar_io",
    }
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        stages[stage_of(frames)] += n
        for name, pattern in keys.items():
            if any(re.search(pattern, f) for f in frames):
                inclusive[name] += n
    return total, stages, inclusive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=0.0)
    args = parser.parse_args()
    total, stages, inclusive = summarize(args.profile)
    print(f"samples: {total}", end="")
    if args.seconds:
        print(f" ({total / (args.rate * args.seconds):.0%} of the wall time)", end="")
    print("\n\n| stage (innermost frame) | samples | share |\n|---|---|---|")
    for stage, n in stages.most_common():
        print(f"| {stage} | {n} | {n / total:.1%} |")
    print("\n| inclusive (frame anywhere on the stack) | samples | share |\n|---|---|---|")
    for name, n in inclusive.most_common():
        print(f"| {name} | {n} | {n / total:.1%} |")


if __name__ == "__main__":
    main()
