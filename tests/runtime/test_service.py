"""The HTTP pieces every service shares: ``/health``'s answer and ``/metrics``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
from fastapi import FastAPI
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from carom_runtime.service import add_metrics, health_response


def test_health_is_json_with_the_code_probes_read() -> None:
    up = health_response(True, {"pulsar": "up"})
    down = health_response(False, {"pulsar": "down", "down_s": 1.5})
    assert (up.status_code, up.body) == (200, b'{"pulsar":"up"}')
    assert (down.status_code, down.body) == (503, b'{"pulsar":"down","down_s":1.5}')
    assert up.media_type == "application/json"


class _Counts:
    def __init__(self) -> None:
        self.n = 0

    def collect(self) -> Iterator[Metric]:
        self.n += 1
        yield CounterMetricFamily("carom_test_scrapes", "scrapes so far", value=self.n)


def test_metrics_are_read_fresh_per_scrape_and_apart_per_app() -> None:
    a, b = FastAPI(), FastAPI()
    add_metrics(a, _Counts())
    add_metrics(b, _Counts())  # the same names in a second app: no clash (a registry each)

    async def scrape(app: FastAPI) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            return await http.get("/metrics")

    for expected in (1.0, 2.0):
        r = asyncio.run(scrape(a))
        assert r.headers["content-type"].startswith("text/plain")
        (family,) = text_string_to_metric_families(r.text)
        assert family.samples[0].value == expected
    (family,) = text_string_to_metric_families(asyncio.run(scrape(b)).text)
    assert family.samples[0].value == 1.0
