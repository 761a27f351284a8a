"""Each package's imports are covered by the dependencies it declares, and by no more.

The distribution's base dependencies serve the contract, the runtime helpers and the CLI; each
service (and the clients, the report, the browser pages) adds its own extra, and each service's
image installs ``carom[<its extra>]`` only. This check follows every import of a package's modules
(lazy ones too) and of the shared modules they import, maps third-party modules to the
distributions that provide them, and fails when one is not declared, so a router change that
starts importing aiortc cannot build an image that breaks at run time. Unknown third-party
modules fail too: a new dependency must be named here and declared in pyproject.toml.
"""

from __future__ import annotations

import re
import sys
import tomllib
from collections.abc import Iterable, Mapping

import pytest

from tests.deploy.deployfiles import ROOT, SERVICES
from tests.test_architecture import graph

#: Third-party top-level module -> the distribution (as pyproject names it) that provides it.
PROVIDED_BY = {
    "msgspec": "msgspec",
    "yaml": "pyyaml",
    "pulsar": "pulsar-client",
    "_pulsar": "pulsar-client",
    "fastapi": "fastapi",
    "starlette": "fastapi",  # fastapi's own dependency, used for its request types
    "uvicorn": "uvicorn",
    "prometheus_client": "prometheus-client",
    "aiortc": "aiortc",
    "aioice": "aiortc",  # aiortc's ICE library (carom_runtime.ice patches it)
    "av": "av",
    "numpy": "numpy",
    "aioquic": "aioquic",
    "cryptography": "cryptography",
    "httpx": "httpx",
    "matplotlib": "matplotlib",
    "playwright": "playwright",
}

#: Package -> the extras an install of it carries (the base dependencies always).
EXTRAS_OF = {
    "carom": (),
    "carom_cli": ("media",),  # media: `carom-channels save`'s media files only
    "carom_simulator": ("simulator",),
    "carom_router": ("router",),
    "carom_tracker": ("tracker", "report"),  # report: carom-report's plots only
    "carom_client": ("client", "browser"),  # browser: carom_client.chromium only
    "carom_recorder": ("recorder",),
}
#: The service image -> the extra its Dockerfile installs.
IMAGE_EXTRA = {
    "simulator": "simulator", "router": "router", "tracker": "tracker", "recorder": "recorder",
}  # fmt: skip
SHARED = ("carom", "carom_runtime")


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower()


def declared(extras: Iterable[str]) -> set[str]:
    """The distributions an install of ``carom[extras]`` brings (extras of extras resolved)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional: Mapping[str, list[str]] = project["optional-dependencies"]
    out = {_name(r) for r in project["dependencies"]}
    todo = list(extras)
    while todo:
        for req in optional[todo.pop()]:
            name = _name(req)
            if name == "carom":
                todo += re.findall(r"[a-z]+", req.split("[", 1)[1])
            else:
                out.add(name)
    return out


def needed(package: str, edges: Mapping[str, set[str]]) -> dict[str, str]:
    """Third-party module -> the module of ``package`` (or a shared one it uses) importing it."""
    mods = [m for m in edges if m.split(".")[0] == package]
    seen: set[str] = set()
    out: dict[str, str] = {}
    while mods:
        mod = mods.pop()
        if mod in seen:
            continue
        seen.add(mod)
        for target in edges[mod]:
            top = target.split(".")[0]
            if target in edges and (top == package or top in SHARED):
                mods.append(target)
            elif top not in edges and top not in sys.stdlib_module_names and top != "__future__":
                out.setdefault(top, mod)
    return out


@pytest.mark.parametrize("package", sorted(EXTRAS_OF))
def test_every_import_is_declared(package: str) -> None:
    have = declared(EXTRAS_OF[package])
    problems = []
    for module, where in sorted(needed(package, graph()).items()):
        dist = PROVIDED_BY.get(module)
        if dist is None:
            problems.append(f"{where} imports {module}: unknown here (name it in PROVIDED_BY)")
        elif dist not in have:
            problems.append(f"{where} imports {module}: {dist} is not in {EXTRAS_OF[package]}")
    assert not problems, "\n".join(problems)


def test_a_service_image_lacks_the_other_services_libraries() -> None:
    # The point of the extras: the router needs no video stack, the simulator no QUIC stack.
    assert not declared(["router"]) & {"aiortc", "av", "numpy"}
    assert not declared(["simulator"]) & {"aioquic"}
    assert not declared(["tracker"]) & {"aiortc", "av", "aioquic"}
    assert not declared(["recorder"]) & {"aiortc", "aioquic", "httpx"}
    assert declared(["services"]) >= declared(["recorder"])
    assert declared(["services"]) >= declared(["simulator"]) | declared(["router"])


def test_an_undeclared_import_is_caught() -> None:
    edges = graph()
    broken = {**edges, "carom_router.link": {"aiortc"}, "carom_router": {"carom_router.link"}}
    assert needed("carom_router", broken)["aiortc"] == "carom_router.link"
    assert "aiortc" not in declared(EXTRAS_OF["carom_router"])


@pytest.mark.parametrize("name", sorted(IMAGE_EXTRA))
def test_each_image_installs_its_own_extra(name: str) -> None:
    # Both the download (``"$(ls /wheels/carom-*.whl)[x]"``) and the install (``"carom[x]"``).
    text = SERVICES[name].dockerfile.read_text()
    installs = re.findall(r"carom(?:-\*\.whl\))?\[([a-z,]+)\]", text)
    assert installs and set(installs) == {IMAGE_EXTRA[name]}, installs
    assert len(installs) == 2, installs
