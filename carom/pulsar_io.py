"""Thin Pulsar glue shared by the services: one way to make clients, producers and to publish.

Hot paths publish with the sync client's ``send_async`` + callback (measured here: ~33k msg/s from
an asyncio loop, vs ~15k for ``pulsar.asyncio``); the callback runs on the client's I/O thread
and only touches counters, so the event loop never blocks on Pulsar.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

import pulsar

from carom.config import PulsarSettings

_LEVELS = {
    logging.DEBUG: pulsar.LoggerLevel.Debug,
    logging.INFO: pulsar.LoggerLevel.Info,
    logging.WARNING: pulsar.LoggerLevel.Warn,
    logging.ERROR: pulsar.LoggerLevel.Error,
}


def quiet_logger(level: int = logging.WARNING) -> object:
    """The C++ client's logger (``pulsar.ConsoleLogger``/``FileLogger``), filtered in C++.

    ``level`` above ERROR: silent.

    Never a Python ``logging.Logger``: the client then calls into Python for every DEBUG line,
    whatever the logger's level. Measured: 10 calls per message received and acked, each taking
    the GIL, which cost the tracker more than its whole join.
    """
    if level > logging.ERROR:
        silent: object = pulsar.FileLogger(pulsar.LoggerLevel.Error, os.devnull)
        return silent
    console: object = pulsar.ConsoleLogger(_LEVELS.get(level, pulsar.LoggerLevel.Warn))
    return console


def make_client(settings: PulsarSettings, logger: object | None = None) -> pulsar.Client:
    return pulsar.Client(
        settings.url,
        operation_timeout_seconds=settings.operation_timeout_s,
        connection_timeout_ms=min(10_000, settings.operation_timeout_s * 1000),
        logger=logger or quiet_logger(),
    )


def make_producer(
    client: pulsar.Client, topic: str, settings: PulsarSettings, name: str | None = None
) -> pulsar.Producer:
    """The one producer configuration every Carom service uses (benchmarked in bench/)."""
    return client.create_producer(
        topic,
        producer_name=name,
        batching_enabled=settings.batching,
        batching_max_publish_delay_ms=settings.batching_max_delay_ms,
        batching_max_messages=settings.batching_max_messages,
        batching_type=pulsar.BatchingType.KeyBased
        if settings.batching_type == "key_based"
        else pulsar.BatchingType.Default,
        max_pending_messages=settings.max_pending_messages,
        block_if_queue_full=False,
        send_timeout_millis=30_000,
    )


class Publisher:
    """Fire-and-count publishing with a bound on messages not yet confirmed by the broker.

    ``publish`` never blocks: past ``max_in_flight`` the message is refused and counted in
    ``dropped`` so the caller can push back or report it. Broker failures land in ``failed``.
    """

    def __init__(
        self,
        producer: pulsar.Producer,
        max_in_flight: int,
        on_result: Callable[[bool], None] | None = None,
    ) -> None:
        self._producer = producer
        self._max = max_in_flight
        self._on_result = on_result
        self.sent = 0  # written by the publishing thread only
        self.acked = 0  # written by the client's I/O thread only
        self.failed = 0  # idem
        self.dropped = 0  # publishing thread only
        self.last_error: str | None = None
        self._drained = threading.Condition()

    @property
    def in_flight(self) -> int:
        return self.sent - self.acked - self.failed

    def publish(self, payload: bytes, key: str) -> bool:
        if self.in_flight >= self._max:
            self.dropped += 1
            return False
        self.sent += 1
        self._producer.send_async(payload, self._callback, partition_key=key)
        return True

    def _callback(self, res: pulsar.Result, _msg_id: object) -> None:
        if res == pulsar.Result.Ok:
            self.acked += 1
        else:
            self.failed += 1
            self.last_error = str(res)
        if self._on_result is not None:
            self._on_result(res == pulsar.Result.Ok)
        if self.in_flight == 0:
            with self._drained:
                self._drained.notify_all()

    def drain(self, timeout: float) -> bool:
        """Block (call it from a thread of its own) until every sent message is settled."""
        self._producer.flush()
        with self._drained:
            return self._drained.wait_for(lambda: self.in_flight == 0, timeout)
