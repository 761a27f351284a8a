"""A video session straight with a simulator (no router), with the token the tests' router has."""

from __future__ import annotations

from collections.abc import Callable

from carom_client import video
from carom_client.video import DecodedFrame, VideoClient
from tests.services import SIMULATOR_TOKEN


async def open_direct(
    url: str,
    sid: str,
    on_frame: Callable[[DecodedFrame], None],
    params: dict[str, object] | None = None,
    token: str = SIMULATOR_TOKEN,
) -> tuple[VideoClient, dict[str, object]]:
    """``carom_client.video.open_direct`` with the tests' token (or ``token``)."""
    return await video.open_direct(url, sid, on_frame, params, token=token)
