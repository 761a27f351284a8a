"""The errors topic, read on a thread of its own so the event loop never blocks on Pulsar.

The Pulsar client's ``read_next`` blocks; this thread does that and hands each message to a
callback (``Router.offer_error``) that queues it, bounded, and has the loop drain the queue in
batches.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pulsar

#: Called on the reader's thread with each message's bytes and the loop that should handle it.
OnMessage = Callable[[bytes, asyncio.AbstractEventLoop], None]


class ErrorsReader(threading.Thread):
    """Reads the errors topic on its own thread; the loop drains what it found in batches.

    A reader (non-durable, from the latest message) per router instance: every instance sees
    every result and forwards only its own sessions', so instances never steal each other's.
    Made on the event loop's thread: it keeps that loop for ``on_message``.
    """

    def __init__(self, client: pulsar.Client, topic: str, name: str, on_message: OnMessage) -> None:
        super().__init__(daemon=True, name="carom-errors-reader")
        self.reader = client.create_reader(topic, pulsar.MessageId.latest, reader_name=name)
        self.on_message = on_message
        self.loop = asyncio.get_running_loop()
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                msg = self.reader.read_next(200)
            except pulsar.Timeout:
                continue
            except pulsar.PulsarException:
                if self.halt.is_set():
                    return
                time.sleep(0.5)
                continue
            self.on_message(msg.data(), self.loop)
