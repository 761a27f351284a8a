"""The router's settings (see carom_runtime.config for how file, env and flags fill them)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import msgspec

from carom.impairment import Profile, ProfileName, named
from carom_router.session import Limits
from carom_runtime.config import HttpSettings, PulsarSettings

SERVICE = "router"
#: The checkout the router runs from (its default routes file is there).
REPO_ROOT = Path(__file__).resolve().parents[2]


class WebTransportSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: UDP addresses to listen on. Chromium resolves "localhost" to ::1 for QUIC: keep both.
    hosts: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.1", "::1"])
    port: int = 4433
    path: str = "/wt"
    #: Host put in the WebTransport URL handed to the page (GET /config). Empty: the host the
    #: page's request named (its Host header), so a browser on another machine is sent back to the
    #: address it used, not to 127.0.0.1. Set it where that host does not reach this router's UDP
    #: port (e.g. a port-forward: the page on 127.0.0.1, WebTransport on the node's address).
    public_host: str = ""
    #: Your own certificate and key (e.g. CA-signed); empty: a fresh ECDSA P-256 certificate valid
    #: `cert_days` (<= 14, what Chromium accepts with serverCertificateHashes), renewed in time.
    cert_file: str = ""
    key_file: str = ""
    cert_days: float = 13.0
    renew_before_days: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.port <= 65535:
            raise ValueError("`port` must be within 1..65535")
        if not 0 < self.cert_days <= 14:
            raise ValueError("`cert_days` must be within (0, 14]: Chromium refuses longer")
        if not 0 < self.renew_before_days < self.cert_days:
            raise ValueError("`renew_before_days` must be > 0 and < cert_days")
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("`cert_file` and `key_file` go together")
        if not self.path.startswith("/"):
            raise ValueError("`path` must start with /")


class HttpsSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The page and ``/config`` over HTTPS as well, for browsers on other machines.

    A page served over plain HTTP from any host but localhost / 127.0.0.0/8 is not a secure
    context, and the browser then gives it no WebTransport (Chromium 156: ``isSecureContext``
    false, ``WebTransport`` undefined). Over HTTPS it is one, from any address.
    """

    host: str = "127.0.0.1"
    #: TCP port of the HTTPS listener; 0: none (the default, so routers on one machine never
    #: collide on it). compose and k8s turn it on (8443).
    port: int = 0
    #: Your own certificate (PEM, chain after the leaf) and key for the page; empty: the
    #: WebTransport certificate (self-signed unless ``webtransport.cert_file``: the browser
    #: warns once, see README "Remote users").
    cert_file: str = ""
    key_file: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("`port` must be within 0..65535 (0: no HTTPS listener)")
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("`cert_file` and `key_file` go together")


class LimitsSettings(Limits, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The ``limits`` section: a session's limits (``carom_router.session.Limits``, where their
    defaults and reasons are written) and the router-wide ones below."""

    max_sessions: int = 64
    #: Sessions open at once from one client address (IP); more are refused with 429, so one
    #: script cannot fill the router (it held every slot: 300 CONNECTs, 63 taken, 503 for all
    #: others). 16 is what the simulator serves by default (its ``max_sessions``); raise it for
    #: load tests from one host. Behind a NAT or a SNAT-ing load balancer every client shares one
    #: address: raise it there too.
    max_sessions_per_address: int = 16
    #: Live error results waiting to be forwarded to sessions, all sessions together.
    max_pending_errors: int = 10000

    def __post_init__(self) -> None:
        for name in (
            "max_sessions",
            "max_sessions_per_address",
            "max_report_rate",
            "report_burst",
            "hello_timeout_s",
            "max_bad_messages",
            "max_control_rate",
            "max_error_rate",
            "max_live_control_rate",
            "live_control_burst",
            "max_pending_errors",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be > 0")


class AccessSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: Origins allowed to open sessions (scheme://host:port, as the browser sends it). Empty: the
    #: router's own page only: http://127.0.0.1, localhost and [::1] on ``http.port`` (and
    #: https:// on ``https.port``), and the page at the very host the session's WebTransport
    #: CONNECT names, on one of those ports (a remote user's https://<node>:8443). Once set, only
    #: this list counts: name every host users open, e.g. "https://carom.example.org:8443".
    #: "null" = a page on disk.
    allowed_origins: list[str] = msgspec.field(default_factory=list)
    #: Accept clients that send no Origin (non-browser clients such as carom's Python client).
    #: Kept on: browsers always send Origin with WebTransport, so this only admits scripts, and a
    #: script can send any Origin it likes; refusing a missing one would stop Carom's own Python
    #: clients, not an attacker. Per-address limits (``limits``) are what bound a script.
    allow_missing_origin: bool = True


class SimulatorLink(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    url: str = "http://127.0.0.1:8001"
    timeout_s: float = 15.0
    #: The simulator's shared secret, sent as ``Authorization: Bearer <token>`` on every request
    #: to it; empty: no header (a simulator without a token). Set it from the environment
    #: (``CAROM_ROUTER__SIMULATOR__TOKEN``), not in a file others can read.
    token: str = ""


class ChannelSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The ``channels`` section: where the typed channels' routes and figures live
    (docs/channels.md)."""

    #: The routes file (YAML, ``carom.channels.Routes``). A relative path is taken from the
    #: working directory if it is there, else from the repository root (where the default is).
    routes_file: str = "router/routes.yaml"
    #: Throughput and buffer CSV, one row per type per ``csv_interval_s``; empty: none.
    metrics_csv: str = "metrics/router-channels.csv"
    csv_interval_s: float = 1.0
    #: How often the routes file's modification is looked for (SIGHUP reloads at once too).
    reload_poll_s: float = 1.0

    def __post_init__(self) -> None:
        if not self.routes_file:
            raise ValueError("`routes_file` is required")
        for name in ("csv_interval_s", "reload_poll_s"):
            if not 0 < getattr(self, name) <= 3600:
                raise ValueError(f"`{name}` must be within (0, 3600]")

    def routes_path(self) -> Path:
        path = Path(self.routes_file)
        if path.is_absolute() or path.exists():
            return path
        return REPO_ROOT / path


class RouterSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pulsar: PulsarSettings = msgspec.field(default_factory=PulsarSettings)
    http: HttpSettings = msgspec.field(default_factory=lambda: HttpSettings(port=8000))
    https: HttpsSettings = msgspec.field(default_factory=HttpsSettings)
    webtransport: WebTransportSettings = msgspec.field(default_factory=WebTransportSettings)
    limits: LimitsSettings = msgspec.field(default_factory=LimitsSettings)
    access: AccessSettings = msgspec.field(default_factory=AccessSettings)
    simulator: SimulatorLink = msgspec.field(default_factory=SimulatorLink)
    channels: ChannelSettings = msgspec.field(default_factory=ChannelSettings)
    #: The page the router serves at "/" (empty: live_client.html at the repository root).
    page: str = ""
    #: Names this instance's reader of the errors topic; empty: a random one per start.
    instance: str = ""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: Custom emulated networks by name (``carom.impairment.Profile`` fields; the YAML file
    #: only): the page's picker offers them beside the built-in profiles and sends the chosen
    #: one's fields in its hello, so the simulator needs no copy.
    networks: dict[ProfileName, Profile] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.networks = named(self.networks)

    def origins(self) -> set[str]:
        if self.access.allowed_origins:
            return set(self.access.allowed_origins)
        loopback = ("127.0.0.1", "localhost", "[::1]")
        out = {f"http://{h}:{self.http.port}" for h in loopback}
        if self.https.port:
            out |= {f"https://{h}:{self.https.port}" for h in loopback}
        return out

    def origin_allowed(self, origin: str, authority: str, origins: set[str] | None = None) -> bool:
        """Whether a browser page from ``origin`` may open a session whose CONNECT named
        ``authority`` (host:port of the WebTransport URL).

        With no ``access.allowed_origins``, besides the loopback pages: this router's own page at
        the host the browser used for WebTransport, which /config names after the page's own
        host. A page of another site names its own host in Origin, so it stays out.
        """
        if origin in (self.origins() if origins is None else origins):
            return True
        if self.access.allowed_origins:
            return False
        try:
            o, a = urlsplit(origin), urlsplit(f"//{authority}")
            port = o.port or {"http": 80, "https": 443}.get(o.scheme)
        except ValueError:
            return False
        own = {"http": self.http.port, "https": self.https.port or None}.get(o.scheme)
        return bool(o.hostname) and o.hostname == a.hostname and port == own
