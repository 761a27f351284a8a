"""The page and ``/config`` over HTTPS, beside the plain HTTP listener, for remote browsers.

Why: WebTransport exists only in secure contexts, and a page served over plain HTTP is one only
from localhost / 127.0.0.0/8. Measured with headless Chromium 156: the page from
``http://127.0.0.1`` has ``isSecureContext`` true and ``WebTransport`` a function; the same page
as ``http://carom.test`` (mapped to 127.0.0.1) has neither. Over HTTPS it is a secure context
from any address, so a user on another machine opens ``https://<node>:8443/``.

One more uvicorn server on the router's own event loop, serving the same app (its lifespan is
the HTTP server's: ``lifespan="off"`` here). Its certificate is ``https.cert_file`` when given,
else the WebTransport one, and a renewed WebTransport certificate is loaded into the same TLS
context, so new connections get it without a restart.
"""

from __future__ import annotations

import logging
import socket
import ssl
from typing import Any

import uvicorn

from carom_router.certs import CertBundle, write_temporary

log = logging.getLogger("carom.router")


class HttpsListener:
    """``https://<https.host>:<https.port>/``: the router's app over TLS."""

    def __init__(
        self,
        app: Any,
        host: str,
        port: int,
        cert: CertBundle | tuple[str, str],
        log_level: str = "info",
    ) -> None:
        """``cert``: a bundle (the WebTransport certificate, renewed with ``set_certificate``)
        or the paths of the user's own PEM certificate (chain after the leaf) and key."""
        self.host, self.port = host, port
        self._cert = cert
        self._config = uvicorn.Config(
            app, host=host, port=port, log_level=log_level, access_log=False, lifespan="off",
            timeout_graceful_shutdown=5,
        )  # fmt: skip
        self._server: uvicorn.Server | None = None

    async def start(self) -> None:
        """Bind (an ``OSError`` naming the address if taken) and serve."""
        with write_temporary(self._cert) as (cert_file, key_file):
            self._config.ssl_certfile, self._config.ssl_keyfile = cert_file, key_file
            self._config.load()  # reads the files into its SSLContext
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(self._config.backlog)
        except OSError as exc:
            sock.close()
            raise OSError(f"HTTPS listener on {self.host}:{self.port}: {exc.strerror}") from None
        sock.setblocking(False)
        server = self._server = uvicorn.Server(self._config)
        # What uvicorn's own serve() does before startup(); its main loop (signals, ticks) is
        # the HTTP server's job, which owns the process.
        server.lifespan = self._config.lifespan_class(self._config)
        await server.startup(sockets=[sock])
        log.info("page over HTTPS at https://%s:%d/", self.host, self.port)

    def set_certificate(self, bundle: CertBundle) -> None:
        """Serve ``bundle`` to new connections (a renewed WebTransport certificate)."""
        if isinstance(self._cert, tuple):
            return  # the user's own certificate: theirs to renew
        self._cert = bundle
        context: ssl.SSLContext | None = self._config.ssl
        if context is not None:
            with write_temporary(bundle) as (cert_file, key_file):
                context.load_cert_chain(cert_file, key_file)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            await self._server.shutdown()
