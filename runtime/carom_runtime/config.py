"""Typed configuration: one model per service, filled from YAML, then env, then CLI flags.

Precedence (later wins): the model's defaults < the service's YAML file < environment variables
``CAROM_<SERVICE>__<KEY>__<SUBKEY>`` < command-line flags ``--key-subkey VALUE``.
Values from env and flags are parsed as YAML scalars/lists (``8080``, ``true``, ``[a, b]``).
Any unknown key or bad value raises ``ConfigError`` naming the key; services print it and exit 2.

The models themselves are ``msgspec.Struct`` classes declared with ``forbid_unknown_fields=True``;
shared sections (Pulsar, topics) live here, service sections live in each service.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec
import yaml

C = TypeVar("C", bound=msgspec.Struct)

ENV_PREFIX = "CAROM_"


class ConfigError(ValueError):
    """Invalid configuration; the message names the key and where it came from."""


class TopicNames(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The three Carom topics. Every service and the CLI read names from here only."""

    truth: str = "persistent://public/default/carom-truth"
    centroids: str = "persistent://public/default/carom-centroids"
    errors: str = "persistent://public/default/carom-errors"


class PulsarSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """How a service reaches Pulsar and how it produces (one choice for every hot path)."""

    url: str = "pulsar://127.0.0.1:6650"
    admin_url: str = "http://127.0.0.1:8080"
    topics: TopicNames = msgspec.field(default_factory=TopicNames)
    #: Partitions of each of the three topics: 0 keeps them non-partitioned (the broker creates
    #: them on first use). N > 0: each service creates them with N partitions at start, through
    #: ``admin_url`` (``carom_runtime.pulsar_io.ensure_topics``), and refuses to start on a topic
    #: that exists with another count. Every message is keyed by its session, so a session stays
    #: on one partition, in order; on a cluster, partitions spread a topic over brokers.
    partitions: int = 0
    operation_timeout_s: int = 10
    #: Off: each message is its own entry, sent at once. Measured here (bench/tracker_throughput.py
    #: --hop, 2026-12-02), report published -> tracker computed: the same as key-based batching
    #: with no delay at 60-1,000 frames/s (p50 1.9-2.3 ms both), better at 2,000 frames/s (p50
    #: 2.4-2.7 vs 3.4-3.8 ms, p99 7.1-12.7 vs 11.1-56.8 ms, 4-5 runs each). The price: the
    #: tracker drains a backlog written flat out at 8.4k and 11.2k rows/s (two runs) vs 11.8k
    #: batched with no delay and 13.1k with 1 ms (and the old receiver), one run each (a bare
    #: consumer reads one entry per message: 31-40k msg/s vs 218k); one written at a live 2,000
    #: frames/s at 8.9k vs 11.0k with 1 ms. Flat out end to end, one topic: 27-31k msg/s off,
    #: 20-22k on (bench/pulsar_roundtrip.py's run_case).
    batching: bool = False
    #: "key_based" puts one key (session) per batch, which the tracker's Key_Shared subscription
    #: needs so that each session stays on one replica. "default" mixes keys: measured here it is
    #: the same at 480 msg/s (p50 4.3 vs 3.9-4.7 ms), faster at 1,000 msg/s (3.6 vs 8.4 ms) and
    #: flat out (9.0k vs 6.2k msg/s), but only safe with a single tracker.
    batching_type: Literal["key_based", "default"] = "key_based"
    #: With batching on: 0. Measured here (bench/tracker_throughput.py --hop, 2026-12-02): 1 ms cost
    #: every message of a live stream +1.1-2.6 ms p50 (publish -> consumed at 2,000 msg/s: 4.2
    #: vs 1.6 ms p50; report -> tracker consumed 4.1 vs 3.0 ms at 60 frames/s, 8.9 vs 4.1 ms at
    #: 2,000), while 0 is as fast as no batching at live rates (1.6 ms at 2,000 msg/s) and keeps
    #: batching's throughput flat out (20-22k msg/s end to end, as with 1 ms).
    batching_max_delay_ms: int = 0
    batching_max_messages: int = 1000
    #: Messages not yet confirmed by the broker before a service drops or pushes back.
    max_pending_messages: int = 10000
    #: Where a service spools what it accepted once ``max_pending_messages`` wait for a broker
    #: that is away (``carom_runtime.pulsar_io.Spool``); empty: the system's temp folder.
    spool_dir: str = ""
    #: Disk a service may fill while the broker is away; past it, messages are refused and counted.
    spool_max_mb: int = 1024
    #: What the Pulsar client library itself logs (to the service's stderr): its reconnects and
    #: the broker's errors show at "warning"; "info" adds each producer's and consumer's
    #: (re)connection per partition, to tell which one a failover left behind; "off" is silent.
    #: Filtered in C++ (``carom_runtime.pulsar_io.quiet_logger``).
    client_log: Literal["debug", "info", "warning", "error", "off"] = "warning"
    #: How long a service keeps trying to reach Pulsar at start before it exits (a broker or a
    #: cluster still starting: seen here, a cold cluster's first partitioned producer took more
    #: than the 10 s operation timeout). 0: one attempt.
    start_timeout_s: int = 60

    def __post_init__(self) -> None:
        if not re.match(r"^pulsar(\+ssl)?://", self.url):
            raise ValueError("`url` must start with pulsar:// or pulsar+ssl://")
        if not re.match(r"^https?://", self.admin_url):
            raise ValueError("`admin_url` must start with http:// or https://")
        for name in (
            "operation_timeout_s",
            "batching_max_messages",
            "max_pending_messages",
            "spool_max_mb",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1")
        if not 0 <= self.start_timeout_s <= 3600:
            raise ValueError("`start_timeout_s` must be within 0..3600")
        if not 0 <= self.partitions <= 256:
            raise ValueError("`partitions` must be within 0..256")
        if not 0 <= self.batching_max_delay_ms <= 1000:
            raise ValueError("`batching_max_delay_ms` must be within 0..1000")


class HttpSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A service's HTTP listener (health, metrics, API)."""

    host: str = "127.0.0.1"
    port: int = 8000

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("`port` must be within 0..65535")


# --- loading -------------------------------------------------------------------------------------

_MSGSPEC_PATH = re.compile(r" - at `\$((?:\.[A-Za-z0-9_]+|\[\d+\])*)`$")
_UNKNOWN = re.compile(r"Object contains unknown field `([^`]+)`")


def _explain(exc: msgspec.ValidationError, source: str) -> ConfigError:
    text = str(exc)
    path = ""
    m = _MSGSPEC_PATH.search(text)
    if m:
        path = m.group(1).lstrip(".")
        text = text[: m.start()]
    own = re.match(r"^`([A-Za-z0-9_]+)` (.*)$", text)
    if own:  # raised by a section's __post_init__: the key is the section plus the field.
        path = f"{path}.{own.group(1)}" if path else own.group(1)
        text = own.group(2)
    u = _UNKNOWN.search(text)
    if u:
        key = f"{path}.{u.group(1)}" if path else u.group(1)
        return ConfigError(f"unknown config key '{key}' ({source})")
    return ConfigError(f"bad value for config key '{path or '?'}': {text} ({source})")


def _leaves(model: type[msgspec.Struct], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every settable key path of a model (nested Structs are sections)."""
    for f in msgspec.structs.fields(model):
        t = f.type
        if isinstance(t, type) and issubclass(t, msgspec.Struct):
            yield from _leaves(t, (*prefix, f.name))
        else:
            yield (*prefix, f.name)


def _set(tree: dict[str, Any], path: Sequence[str], value: Any) -> None:
    for part in path[:-1]:
        node = tree.get(part)
        if not isinstance(node, dict):
            node = tree[part] = {}
        tree = node
    tree[path[-1]] = value


def _scalar(text: str) -> Any:
    """An env/flag value as YAML (numbers, booleans, lists), else the text itself.

    No leaf is a mapping, so a mapping means text that YAML misread: ``::`` is ``{':': None}``.
    """
    try:
        value = yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text
    return text if isinstance(value, dict) else value


def env_var(service: str, path: Sequence[str]) -> str:
    """The environment variable that sets ``path`` for ``service`` (used by compose and k8s)."""
    return f"{ENV_PREFIX}{service.upper()}__" + "__".join(p.upper() for p in path)


def flag(path: Sequence[str]) -> str:
    return "--" + "-".join(p.replace("_", "-") for p in path)


def add_flags(parser: argparse.ArgumentParser, model: type[msgspec.Struct]) -> None:
    """Add ``--config`` and one ``--key-subkey`` flag per setting of ``model``."""
    parser.add_argument("--config", metavar="FILE", help="YAML config file")
    group = parser.add_argument_group("settings (override the YAML file and env)")
    for path in _leaves(model):
        group.add_argument(flag(path), dest="cfg__" + "__".join(path), metavar="VALUE")


def load(
    model: type[C],
    service: str,
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    args: argparse.Namespace | None = None,
) -> C:
    """Build a service's settings from defaults, its YAML file, env and parsed CLI flags."""
    env = os.environ if env is None else env
    path = path or (getattr(args, "config", None) if args is not None else None)
    path = path or env.get(f"{ENV_PREFIX}{service.upper()}_CONFIG")
    tree: dict[str, Any] = {}
    source = "defaults"
    if path:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys")
        tree = loaded or {}
    try:
        base = msgspec.convert(tree, model)
    except msgspec.ValidationError as exc:
        raise _explain(exc, source) from None
    # Env and flags set leaves on the whole tree: on the YAML alone, a section it lacks would be
    # rebuilt from the section type's defaults, not the service's (the tracker's http.port 8002).
    tree = msgspec.to_builtins(base)

    known = {env_var(service, p): p for p in _leaves(model)}
    prefix = f"{ENV_PREFIX}{service.upper()}__"
    for name, value in env.items():
        if name.startswith(prefix):
            if name not in known:
                raise ConfigError(f"unknown config key in environment variable {name}")
            _set(tree, known[name], _scalar(value))
    if args is not None:
        for key, value in vars(args).items():
            if key.startswith("cfg__") and value is not None:
                _set(tree, key[5:].split("__"), _scalar(value))
    try:
        return msgspec.convert(tree, model, strict=False)
    except msgspec.ValidationError as exc:
        raise _explain(
            exc, "env/flags" if source == "defaults" else f"{source} + env/flags"
        ) from None


def dump(settings: msgspec.Struct) -> str:
    """Settings as YAML, e.g. to ship a service's default config file."""
    return str(yaml.safe_dump(msgspec.to_builtins(settings), sort_keys=False))
