"""The router's HTTP side (FastAPI): the page, its ``/config``, ``/routes``, ``/health`` and
``/metrics``.

Its lifespan runs the whole router (QUIC, Pulsar, certificate renewal), so uvicorn's signal
handling and graceful shutdown are the router's too (``carom_router.main``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
from fastapi import FastAPI, Request, Response
from fastapi.responses import FileResponse

from carom import protocol as p
from carom.impairment import PROFILES
from carom_router.https import HttpsListener
from carom_router.metrics import RouterMetrics
from carom_router.router import Router
from carom_runtime.service import add_metrics, health_response

log = logging.getLogger("carom.router")

REPO_PAGE = Path(__file__).resolve().parents[2] / "live_client.html"


def create_http_app(router: Router) -> FastAPI:
    """The FastAPI app that serves ``router``; its lifespan starts the router and stops it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await router.start()
        https = _https_listener(app, router)
        if https is not None:
            try:
                await https.start()
            except OSError:
                await router.stop()
                raise
            router.on_certificate.append(https.set_certificate)
        renew = asyncio.get_running_loop().create_task(router.renew_certificates())
        try:
            yield
        finally:
            renew.cancel()
            if https is not None:
                await https.stop()
            await router.stop()
            log.info("router stopped: %s", dict(sorted(router.counters.items())))

    app = FastAPI(title="Carom router", lifespan=lifespan)
    page = Path(router.settings.page) if router.settings.page else REPO_PAGE

    @app.get("/")
    async def index() -> Response:
        if not page.exists():
            return Response(f"page not found: {page}", 404)
        # COOP/COEP give the page 5 us performance.now() instead of 100 us.
        return FileResponse(
            page,
            media_type="text/html",
            headers={
                "Cross-Origin-Opener-Policy": "same-origin",
                "Cross-Origin-Embedder-Policy": "require-corp",
                "Cache-Control": "no-store",
            },
        )

    @app.get("/config")
    async def config(request: Request) -> Response:
        # The host this request named: a browser on another machine is sent back to it.
        host = request.url.hostname or ""
        https_port = router.settings.https.port
        body = {
            "webtransport_url": router.webtransport_url(host),
            # Where this page is a secure context from this host (null: no HTTPS listener).
            "page_https_url": f"https://{_bracketed(host)}:{https_port}/" if https_port else None,
            "cert_sha256_hex": router.cert.sha256_hex,
            "cert_sha256_b64": router.cert.sha256_b64,
            "cert_not_after": router.cert.not_after.isoformat(),
            "protocol": p.PROTOCOL_VERSION,
            "max_report_rate": router.settings.limits.max_report_rate,
            # The emulated networks the page's picker offers (carom.impairment): the built-in
            # ones by name, then this router's own (``networks``), whose fields the page sends.
            "network_profiles": [*PROFILES, *router.settings.networks],
            "network_fields": {
                name: msgspec.to_builtins(p) for name, p in router.settings.networks.items()
            },
        }
        return Response(
            msgspec.json.encode(body),
            media_type="application/json",
            headers={"Access-Control-Allow-Origin": "*", "Cache-Control": "no-store"},
        )

    @app.get("/routes")
    async def routes() -> Response:
        """The typed channels' routes in force, their file, and the last refused reload."""
        return Response(
            msgspec.json.encode(router.channels.describe()),
            media_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    @app.get("/health")
    async def health() -> Response:
        ok, body = await router.health()
        return health_response(ok, body)

    add_metrics(app, RouterMetrics(router))
    return app


def _https_listener(app: FastAPI, router: Router) -> HttpsListener | None:
    s = router.settings
    if not s.https.port:
        return None
    own = (s.https.cert_file, s.https.key_file) if s.https.cert_file else None
    return HttpsListener(app, s.https.host, s.https.port, own or router.cert, s.log_level)


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host
