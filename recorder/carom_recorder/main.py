"""``carom-recorder`` / ``python -m carom_recorder``: run the recorder service, or
``carom-recorder report DIR``: print what it recorded under DIR (verdicts, latency per type)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from carom_recorder.config import SERVICE, RecorderSettings
from carom_runtime import service


def _app(settings: RecorderSettings) -> Any:
    from carom_recorder.app import create_app  # heavy imports once the config is known good

    return create_app(settings)


def report_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="carom-recorder report",
        description="Per-type latency and per-session exactly-once verdicts of a recordings dir.",
    )
    parser.add_argument("dir", help="the recorder's out_dir (default config: recordings)")
    args = parser.parse_args(argv)
    root = Path(args.dir)
    if not root.is_dir():
        print(f"carom-recorder report: {root} is not a folder", file=sys.stderr)
        return 2
    from carom_recorder.report import report

    print(report(root))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    return service.run(
        "carom-recorder",
        "Carom recorder: every channel topic to files per session (media, chat, points), each "
        "message once, with its latency. `carom-recorder report DIR` prints what it recorded.",
        RecorderSettings,
        SERVICE,
        _app,
        argv,
    )


def run() -> None:
    sys.exit(main())
