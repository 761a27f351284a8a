"""The house rules, checked on every import of every module (pure: reads the sources, runs none).

- Services never import each other: the simulator, the router and the tracker meet only on
  Pulsar topics and HTTP. Nor do they import the clients, the CLI or the local runner.
- The contract ``carom`` imports nothing of Carom's but itself, and of the rest only the standard
  library and msgspec: the page, the services and the clients agree on it, so it carries no
  runtime.
- The runtime helpers ``carom_runtime`` and the CLI ``carom_cli`` import no service, client or
  runner (the CLI may use the runtime helpers; they may not use the CLI).
- The clients (``carom_client``) import no service: they reach services over the network only.
- Pure cores do no I/O: they import no network, process, thread or event-loop library (aioquic's
  in-memory ``aioquic.buffer`` excepted), and of Carom's own modules only other pure cores.
  They are the parts unit-tested in memory.

``tests/test_architecture.py::test_a_broken_import_is_caught`` shows each rule failing on a graph
with one bad edge; a rule that cannot fail would be a habit, not a check.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Top-level package -> its folder.
PACKAGES: dict[str, Path] = {
    "carom": ROOT / "carom",
    "carom_runtime": ROOT / "runtime" / "carom_runtime",
    "carom_cli": ROOT / "cli" / "carom_cli",
    "carom_simulator": ROOT / "simulator" / "carom_simulator",
    "carom_router": ROOT / "router" / "carom_router",
    "carom_tracker": ROOT / "tracker-service" / "carom_tracker",
    "carom_recorder": ROOT / "recorder" / "carom_recorder",
    "carom_client": ROOT / "client" / "carom_client",
    "carom_local": ROOT / "local" / "carom_local",
}
SERVICES = frozenset({"carom_simulator", "carom_router", "carom_tracker", "carom_recorder"})
NOT_FOR_SERVICES = SERVICES | {"carom_client", "carom_cli", "carom_local"}
#: What the contract may import besides itself and the standard library.
CONTRACT_DEPENDS_ON = frozenset({"msgspec", "__future__"})
STDLIB = frozenset(sys.stdlib_module_names)

#: Modules with no I/O: physics, rendering, centroid, schemas and formats, protocol state machines,
#: the join and its rows, accounting, the ball's colour rule.
PURE = frozenset(
    {
        "carom.accounting",
        "carom.channels",
        "carom.detection",
        "carom.impairment",
        "carom_client.centroid",
        "carom_client.core",
        "carom_recorder.ledger",
        "carom.protocol",
        "carom.schemas",
        "carom.signaling",
        "carom_router.channels",
        "carom_router.session",
        "carom_router.status",
        "carom_runtime.webtransport",
        "carom_simulator.origin",
        "carom_simulator.physics",
        "carom_simulator.render",
        "carom_simulator.timeline",
        "carom_tracker.csvrow",
        "carom_tracker.join",
        "carom_tracker.pacing",
    }
)
#: Libraries a pure core must not import (the top-level name).
IO_LIBRARIES = frozenset(
    {
        "aioice", "aioquic", "aiortc", "asyncio", "av", "concurrent", "fastapi", "http", "httpx",
        "matplotlib", "multiprocessing", "playwright", "prometheus_client", "pulsar", "selectors",
        "socket", "ssl", "starlette", "subprocess", "threading", "urllib", "uvicorn",
    }
)  # fmt: skip
#: Modules of those libraries a pure core may import: aioquic's in-memory byte buffer (varints).
PURE_MAY_IMPORT = frozenset({"aioquic.buffer"})


def module_name(package: str, folder: Path, path: Path) -> str:
    parts = path.relative_to(folder).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((package, *parts))


def imports_of(source: str, module: str, known: Iterable[str]) -> set[str]:
    """Every module ``module``'s source imports, at any depth of the file (lazy imports too).

    ``from carom import schemas`` is ``carom.schemas`` when that is a module of ours; relative
    imports are resolved against ``module``.
    """
    ours = set(known)
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[: -node.level]
                base = ".".join([*parent, base] if base else parent)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in ours else base)
    return out


def graph() -> dict[str, set[str]]:
    """Module -> what it imports, for every module of Carom's packages."""
    files = {
        module_name(pkg, folder, path): path
        for pkg, folder in PACKAGES.items()
        for path in folder.rglob("*.py")
    }
    return {mod: imports_of(path.read_text(), mod, files) for mod, path in files.items()}


def violations(edges: Mapping[str, Iterable[str]]) -> list[str]:
    """Every broken rule, one line each, naming the importer and the imported."""
    out: list[str] = []
    for mod, targets in sorted(edges.items()):
        pkg = mod.split(".")[0]
        for target in sorted(set(targets)):
            top = target.split(".")[0]
            if pkg in SERVICES and top in NOT_FOR_SERVICES and top != pkg:
                out.append(f"{mod} imports {target}: services meet only on Pulsar and HTTP")
            if pkg == "carom" and top != "carom" and top not in STDLIB | CONTRACT_DEPENDS_ON:
                out.append(f"{mod} imports {target}: the contract depends on msgspec only")
            if pkg in {"carom_runtime", "carom_cli"} and top in NOT_FOR_SERVICES - {"carom_cli"}:
                out.append(f"{mod} imports {target}: shared helpers import no service")
            if pkg == "carom_runtime" and top == "carom_cli":
                out.append(f"{mod} imports {target}: shared helpers import no service")
            if pkg == "carom_client" and top in SERVICES:
                out.append(f"{mod} imports {target}: clients reach services over the network")
            if mod in PURE and top in IO_LIBRARIES and target not in PURE_MAY_IMPORT:
                out.append(f"{mod} imports {target}: a pure core does no I/O")
            if mod in PURE and top in PACKAGES and target not in PURE and target != top:
                out.append(f"{mod} imports {target}: a pure core imports only pure cores")
    return out


def test_the_tree_keeps_the_rules() -> None:
    edges = graph()
    # A renamed or moved core must not drop out of the check unnoticed.
    assert set(edges) >= PURE, sorted(PURE - set(edges))
    assert not violations(edges), "\n".join(violations(edges))


@pytest.mark.parametrize(
    ("importer", "imported", "rule"),
    [
        ("carom_simulator.sessions", "carom_router.session", "services meet only"),
        ("carom_tracker.app", "carom_client.chromium", "services meet only"),
        ("carom.protocol", "carom_router.session", "contract depends on msgspec only"),
        ("carom.schemas", "carom_runtime.pulsar_io", "contract depends on msgspec only"),
        ("carom.signaling", "numpy", "contract depends on msgspec only"),
        ("carom_runtime.pulsar_io", "carom_tracker.join", "shared helpers import no service"),
        ("carom_runtime.config", "carom_cli.main", "shared helpers import no service"),
        ("carom_cli.main", "carom_client.probe", "shared helpers import no service"),
        ("carom_client.session", "carom_simulator.physics", "clients reach services"),
        ("carom_simulator.physics", "asyncio", "pure core does no I/O"),
        ("carom_tracker.join", "pulsar", "pure core does no I/O"),
        ("carom_runtime.webtransport", "aioquic.asyncio", "pure core does no I/O"),
        ("carom_router.session", "carom_runtime.pulsar_io", "imports only pure cores"),
    ],
)
def test_a_broken_import_is_caught(importer: str, imported: str, rule: str) -> None:
    edges = graph()
    assert not violations(edges)
    broken = {**edges, importer: {*edges[importer], imported}}
    found = violations(broken)
    assert found and all(f.startswith(f"{importer} imports {imported}: ") for f in found), found
    assert any(rule in f for f in found), found


def test_imports_are_read_at_any_depth_and_resolved() -> None:
    source = (
        "from carom import schemas, signaling\n"
        "from . import physics\n"
        "def later():\n"
        "    import carom_router.app\n"
        "    from carom_runtime.pulsar_io import Publisher\n"
    )
    known = {
        "carom.schemas",
        "carom.signaling",
        "carom_simulator.physics",
        "carom_runtime.pulsar_io",
    }
    got = imports_of(source, "carom_simulator.track", known)
    assert got == {
        "carom.schemas", "carom.signaling", "carom_simulator.physics", "carom_router.app",
        "carom_runtime.pulsar_io",
    }  # fmt: skip
