"""The page over HTTPS (carom_router.https) and who may open sessions from it
(RouterSettings.origin_allowed), without a broker."""

from __future__ import annotations

import asyncio
import socket
import ssl

import pytest
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from carom_router.certs import make_certificate
from carom_router.config import AccessSettings, HttpsSettings, RouterSettings
from carom_router.https import HttpsListener
from carom_runtime.config import HttpSettings


def _settings(https_port: int = 8443, allowed: list[str] | None = None) -> RouterSettings:
    return RouterSettings(
        http=HttpSettings(port=8000),
        https=HttpsSettings(port=https_port),
        access=AccessSettings(allowed_origins=allowed or []),
    )


def test_default_origins_are_the_routers_own_pages_http_and_https() -> None:
    s = _settings()
    assert s.origins() == {
        "http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000",
        "https://127.0.0.1:8443", "https://localhost:8443", "https://[::1]:8443",
    }  # fmt: skip
    assert not any(o.startswith("https") for o in _settings(https_port=0).origins())


@pytest.mark.parametrize(
    ("origin", "authority", "ok"),
    [
        # The router's own page at the host the browser used for WebTransport too.
        ("https://10.231.7.2:8443", "10.231.7.2:4433", True),
        ("https://carom.example.org:8443", "carom.example.org:4433", True),
        ("http://10.231.7.2:8000", "10.231.7.2:4433", True),
        ("https://[fd00::2]:8443", "[fd00::2]:4433", True),
        # Another site, another port of the same host, the wrong scheme for a port: refused.
        ("https://evil.example", "10.231.7.2:4433", False),
        ("https://evil.example:8443", "10.231.7.2:4433", False),
        ("https://10.231.7.2:9999", "10.231.7.2:4433", False),
        ("http://10.231.7.2:8443", "10.231.7.2:4433", False),
        ("null", "10.231.7.2:4433", False),
        ("https://10.231.7.2:8443", "", False),
        ("https://[broken", "10.231.7.2:4433", False),
    ],
)
def test_the_page_at_the_host_webtransport_names_is_allowed(
    origin: str, authority: str, ok: bool
) -> None:
    assert _settings().origin_allowed(origin, authority) is ok


def test_without_https_only_the_http_page_counts() -> None:
    s = _settings(https_port=0)
    assert not s.origin_allowed("https://10.231.7.2:443", "10.231.7.2:4433")
    assert s.origin_allowed("http://10.231.7.2:8000", "10.231.7.2:4433")


def test_an_explicit_list_is_the_whole_list() -> None:
    s = _settings(allowed=["https://carom.example.org:8443"])
    assert s.origin_allowed("https://carom.example.org:8443", "10.0.0.9:4433")
    assert not s.origin_allowed("https://10.231.7.2:8443", "10.231.7.2:4433")


def _served_der(port: int) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


@pytest.mark.asyncio
async def test_serves_the_app_over_tls_and_swaps_a_renewed_certificate() -> None:
    app = FastAPI()

    @app.get("/")
    async def index() -> PlainTextResponse:
        return PlainTextResponse("page")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    first, second = make_certificate(days=1), make_certificate(days=1)
    listener = HttpsListener(app, "127.0.0.1", port, first, "warning")
    await listener.start()
    try:
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, _served_der, port) == first.der

        def get() -> str:
            import httpx

            return httpx.get(f"https://127.0.0.1:{port}/", verify=False, trust_env=False).text

        assert await loop.run_in_executor(None, get) == "page"
        listener.set_certificate(second)
        assert await loop.run_in_executor(None, _served_der, port) == second.der
        taken = HttpsListener(app, "127.0.0.1", port, first, "warning")
        with pytest.raises(OSError, match=f"HTTPS listener on 127.0.0.1:{port}"):
            await taken.start()
    finally:
        await listener.stop()


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="go together"):
        HttpsSettings(port=8443, cert_file="a.pem")
    with pytest.raises(ValueError, match=r"0\.\.65535"):
        HttpsSettings(port=70000)
