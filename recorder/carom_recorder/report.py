"""``carom-recorder report DIR``: every session's verdicts and per-type latency, from the files.

Reads what the recorder wrote (``<session>/<type>.summary.json`` and ``<type>.latency.csv``);
the figures themselves are ``ledger.report_lines``'.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from carom_recorder.ledger import Row, report_lines
from carom_recorder.store import read_rows


def collect(root: Path) -> tuple[list[dict[str, Any]], dict[str, list[Row]]]:
    summaries: list[dict[str, Any]] = []
    rows: dict[str, list[Row]] = {}
    for path in sorted(root.glob("*/*.summary.json")):
        try:
            summaries.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    for path in sorted(root.glob("*/*.latency.csv")):
        type_ = path.name.removesuffix(".latency.csv")
        rows.setdefault(type_, []).extend(read_rows(path))
    return summaries, rows


def report(root: Path) -> str:
    summaries, rows = collect(root)
    return "\n".join(report_lines(summaries, rows))
