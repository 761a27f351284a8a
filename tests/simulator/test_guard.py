"""The simulator's door, in memory: the token check, body limits, and the config that needs them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import msgspec
import pytest
from starlette.types import Message, Receive, Scope, Send

from carom_runtime import config
from carom_simulator.config import AccessSettings, SimulatorSettings, access_refusal
from carom_simulator.guard import (
    BearerGate,
    BodyBuffer,
    BodyError,
    TokenCheck,
    Verdict,
    declared_length,
    read_body,
    refuse,
)

TOKEN = "s3cret-token-0123456789_abcdef"


def test_token_check_verdicts() -> None:
    check = TokenCheck(TOKEN)
    assert check.verdict(f"Bearer {TOKEN}".encode()) == "ok"
    assert check.verdict(f"bearer  {TOKEN} ".encode()) == "ok"  # scheme is case-insensitive
    assert check.verdict(None) == "missing"
    assert check.verdict(b"") == "missing"
    assert check.verdict(b"Bearer ") == "missing"
    assert check.verdict(f"Basic {TOKEN}".encode()) == "missing"
    assert check.verdict(b"Bearer " + TOKEN[:-1].encode()) == "wrong"
    assert check.verdict(b"Bearer " + TOKEN.encode() + b"x") == "wrong"
    assert check.verdict(b"Bearer \xff\xfe") == "wrong"  # non-ASCII bytes: refused, no crash
    with pytest.raises(ValueError):
        TokenCheck("")


def test_declared_length() -> None:
    assert declared_length([], 100) is None
    assert declared_length([(b"content-length", b"100")], 100) == 100
    with pytest.raises(BodyError) as big:
        declared_length([(b"content-length", b"10000000")], 100)
    assert big.value.status == 413 and big.value.reason == "oversize"
    for bad in (b"-1", b"1e3", b"", b"12 34", b"9" * 40):
        with pytest.raises(BodyError) as info:
            declared_length([(b"content-length", bad)], 100)
        assert info.value.status == 400 and info.value.reason == "bad_length"


def test_body_buffer_never_holds_more_than_its_limit() -> None:
    buffer = BodyBuffer(10)
    buffer.add(b"12345")
    buffer.add(b"")
    buffer.add(b"67890")
    assert buffer.take() == b"1234567890"
    buffer = BodyBuffer(10)
    buffer.add(b"123456789")
    with pytest.raises(BodyError) as info:
        buffer.add(b"ab")
    assert info.value.status == 413 and buffer.size == 11
    assert buffer.take() == b""  # what it held is let go at once


async def _chunks(parts: list[bytes], delay: float = 0.0) -> AsyncGenerator[bytes, None]:
    for part in parts:
        if delay:
            await asyncio.sleep(delay)
        yield part


@pytest.mark.asyncio
async def test_read_body_stops_at_the_limit_without_reading_on() -> None:
    taken: list[int] = []

    async def endless() -> AsyncGenerator[bytes, None]:
        for i in range(1_000_000):
            taken.append(i)
            yield b"x" * 1000

    with pytest.raises(BodyError) as info:
        await read_body(endless(), [], 5000, 5.0)
    assert info.value.status == 413
    assert len(taken) == 6  # the sixth kilobyte passed 5000 bytes: nothing after it was asked for
    assert await read_body(_chunks([b"ab", b"cd"]), [], 4, 5.0) == b"abcd"


@pytest.mark.asyncio
async def test_read_body_refuses_a_declared_length_before_reading() -> None:
    taken: list[bytes] = []

    async def recorded() -> AsyncGenerator[bytes, None]:
        taken.append(b"x")
        yield b"x"

    with pytest.raises(BodyError) as info:
        await read_body(recorded(), [(b"content-length", b"10485760")], 128_000, 5.0)
    assert info.value.status == 413 and taken == []


@pytest.mark.asyncio
async def test_read_body_times_out_on_a_trickle() -> None:
    with pytest.raises(BodyError) as info:
        await read_body(_chunks([b"x"] * 100, delay=0.02), [], 1000, 0.2)
    assert info.value.status == 408 and info.value.reason == "body_timeout"


async def _call(gate: BearerGate, path: str, headers: list[tuple[bytes, bytes]]) -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: Scope = {"type": "http", "path": path, "headers": headers, "method": "GET"}
    await gate(scope, receive, send)
    return sent


@pytest.mark.asyncio
async def test_bearer_gate_refuses_all_but_the_open_paths() -> None:
    reached: list[str] = []
    refused: list[Verdict] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    gate = BearerGate(app, TokenCheck(TOKEN), refused.append)
    good = [(b"authorization", f"Bearer {TOKEN}".encode())]
    assert (await _call(gate, "/sessions", good))[0]["status"] == 200
    for path in ("/health", "/metrics"):
        assert (await _call(gate, path, []))[0]["status"] == 200
    for path, headers in (
        ("/sessions", []),
        ("/offer", [(b"authorization", b"Bearer nope-nope-nope-nope")]),
        ("/docs", []),  # deny by default: FastAPI's own pages too
        ("/sessions/x", [(b"x-token", TOKEN.encode())]),
    ):
        start, body, end = await _call(gate, path, headers)
        assert start["status"] == 401 and end["more_body"] is False
        headers_out = dict(start["headers"])
        assert headers_out[b"content-type"] == b"application/json"
        assert headers_out[b"www-authenticate"].startswith(b"Bearer")
        assert "access token" in msgspec.json.decode(body["body"])["detail"]
    assert reached == ["/sessions", "/health", "/metrics"]
    assert refused == ["missing", "wrong", "missing", "missing"]


async def _refuse_with(parts: int | None, linger_s: float) -> tuple[list[Message], int, float]:
    """``refuse`` on a body of ``parts`` chunks still unread (None: one that never ends)."""
    sent: list[Message] = []
    read = 0

    async def receive() -> Message:
        nonlocal read
        read += 1
        if parts is None:
            await asyncio.sleep(0.01)
            return {"type": "http.request", "body": b"x" * 1000, "more_body": True}
        return {"type": "http.request", "body": b"x", "more_body": read < parts}

    async def send(message: Message) -> None:
        sent.append(message)

    t0 = asyncio.get_running_loop().time()
    await refuse(receive, send, 413, b'{"detail":"too big"}', linger_s=linger_s)
    return sent, read, asyncio.get_running_loop().time() - t0


@pytest.mark.asyncio
async def test_refuse_answers_at_once_then_drops_the_rest_for_a_bounded_time() -> None:
    """The answer goes out before the unread body is dropped; the response ends (and the
    connection closes) when the body ends, or after ``linger_s`` if it never does."""
    for parts, linger_s in ((3, 5.0), (None, 0.2)):
        sent, read, took = await _refuse_with(parts, linger_s)
        start, answer, end = sent
        assert start["status"] == 413 and (b"connection", b"close") in start["headers"]
        body = {"type": "http.response.body", "body": b'{"detail":"too big"}', "more_body": True}
        assert answer == body
        assert end["more_body"] is False
        if parts is not None:
            assert read == parts and took < 1.0  # ended with the body, not the timer
        else:
            assert 0.2 <= took < 1.0 and read > 5


def test_no_token_refuses_to_start_unless_allowed() -> None:
    refusal = access_refusal(AccessSettings())
    assert refusal is not None and "CAROM_SIMULATOR__ACCESS__TOKEN" in refusal
    assert access_refusal(AccessSettings(allow_no_token=True)) is None
    assert access_refusal(AccessSettings(token=TOKEN)) is None


def test_token_setting_from_env_and_its_checks() -> None:
    env = {config.env_var("simulator", ("access", "token")): TOKEN}
    assert env == {"CAROM_SIMULATOR__ACCESS__TOKEN": TOKEN}
    assert config.load(SimulatorSettings, "simulator", env=env).access.token == TOKEN
    for weak in ("short", "has spaces in it, sixteen+", "ünïcödé-ünïcödé-ünïcödé"):
        bad = {"CAROM_SIMULATOR__ACCESS__TOKEN": weak}
        with pytest.raises(config.ConfigError) as info:
            config.load(SimulatorSettings, "simulator", env=bad)
        assert "access.token" in str(info.value)
        assert weak not in str(info.value)  # a secret is never echoed back


def test_limits_settings_are_checked() -> None:
    for env in (
        {"CAROM_SIMULATOR__MAX_BODY_BYTES": "10"},
        {"CAROM_SIMULATOR__BODY_TIMEOUT_S": "0"},
        {"CAROM_SIMULATOR__CONNECT_TIMEOUT_S": "-1"},
    ):
        with pytest.raises(config.ConfigError):
            config.load(SimulatorSettings, "simulator", env=env)
    assert SimulatorSettings().connect_timeout_s == 5.0
