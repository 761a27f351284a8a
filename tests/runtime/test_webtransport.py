"""WebTransport's wire pieces in memory: varints, capsules, the session close (pure)."""

from __future__ import annotations

import pytest
from aioquic.buffer import size_uint_var
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from carom_runtime.webtransport import (
    CLOSE_WEBTRANSPORT_SESSION,
    MAX_CLOSE_MESSAGE,
    Capsule,
    CapsuleReader,
    SessionClose,
    WireError,
    check_close_code,
    close_reason,
    datagrams_queued,
    encode_capsule,
    encode_close,
    encode_varint,
    header_map,
    parse_close,
    pull_varints,
)


@pytest.mark.parametrize(
    ("value", "length"),
    [(0, 1), (63, 1), (64, 2), (16383, 2), (16384, 4), (2**30 - 1, 4), (2**30, 8), (2**62 - 1, 8)],
)
def test_varints_round_trip_at_each_length_boundary(value: int, length: int) -> None:
    encoded = encode_varint(value)
    assert len(encoded) == length == size_uint_var(value)
    assert pull_varints(encoded + b"\xff", 1) == ([value], length)  # what follows is not read


@pytest.mark.parametrize(
    ("golden", "value"),
    [
        ("c2197c5eff14e88c", 151288809941952652),
        ("9d7f3e7d", 494878333),
        ("7bbd", 15293),
        ("25", 37),
    ],
)
def test_varints_match_rfc_9000_appendix_a1(golden: str, value: int) -> None:
    assert encode_varint(value) == bytes.fromhex(golden)
    assert pull_varints(bytes.fromhex(golden), 1) == ([value], len(golden) // 2)


def test_a_longer_than_needed_varint_still_reads() -> None:
    assert pull_varints(bytes.fromhex("4025"), 1) == ([37], 2)  # RFC 9000 §A.1: also 37


@pytest.mark.parametrize("data", [b"", b"\x40", b"\x9d\x7f\x3e", bytes.fromhex("c2197c5eff14e8")])
def test_a_truncated_varint_waits_for_more(data: bytes) -> None:
    assert pull_varints(data, 1) is None
    assert pull_varints(b"\x25" + data, 2) is None  # the first one alone is not enough


@pytest.mark.parametrize("value", [-1, 2**62, 2**64])
def test_a_value_a_varint_cannot_carry_is_refused(value: int) -> None:
    with pytest.raises(WireError, match="not a QUIC varint"):
        encode_varint(value)
    with pytest.raises(WireError):
        encode_capsule(value, b"")


@pytest.mark.parametrize(
    ("capsule_type", "value"),
    [(0x00, b""), (0x12, b"hello"), (CLOSE_WEBTRANSPORT_SESSION, b"\x00" * 4), (2**62 - 1, b"x")],
)
def test_capsules_round_trip_whole_and_byte_by_byte(capsule_type: int, value: bytes) -> None:
    encoded = encode_capsule(capsule_type, value)
    assert CapsuleReader().feed(encoded) == [Capsule(capsule_type, value)]
    reader = CapsuleReader()
    pieces = [reader.feed(encoded[i : i + 1]) for i in range(len(encoded))]
    assert pieces[:-1] == [[]] * (len(encoded) - 1)  # nothing until the last byte
    assert pieces[-1] == [(capsule_type, value)]


def test_capsule_reader_handles_split_grease_and_large_capsules() -> None:
    close = b"\x80\x00\x28\x43" + b"\x09" + (7).to_bytes(4, "big") + b"gone!"
    grease = b"\x12\x05" + b"hello"  # a GREASE-like type Chromium may send first
    large = b"\x21" + b"\x80\x01\x00\x00" + b"\x00" * 0x10000  # 64 KiB, skipped, never stored
    stream = grease + large + close
    reader = CapsuleReader()
    capsules: list[Capsule] = []
    for i in range(0, len(stream), 777):
        capsules += reader.feed(stream[i : i + 777])
        assert len(reader._buffer) <= 777 + 8  # the large one never accumulates
    assert capsules == [(0x12, b"hello"), (0x2843, (7).to_bytes(4, "big") + b"gone!")]
    assert reader.close == SessionClose(7, "gone!")


def test_close_capsule_round_trips_with_code_and_reason() -> None:
    encoded = encode_close(0xFFFF_FFFF, "bye, ünïcode")
    assert encoded[:2] == b"\x68\x43"  # the shortest type; Chromium's 4-byte form reads too
    ((capsule_type, value),) = CapsuleReader().feed(encoded)
    assert capsule_type == CLOSE_WEBTRANSPORT_SESSION
    assert parse_close(value) == SessionClose(0xFFFF_FFFF, "bye, ünïcode")
    assert parse_close((9).to_bytes(4, "big")) == SessionClose(9, "")


def test_close_message_is_cut_to_1024_bytes() -> None:
    ((_, value),) = CapsuleReader().feed(encode_close(1, "é" * MAX_CLOSE_MESSAGE))
    assert len(value) == 4 + MAX_CLOSE_MESSAGE
    assert parse_close(value).message == "é" * (MAX_CLOSE_MESSAGE // 2)


def test_bad_close_input_raises_a_clear_error() -> None:
    with pytest.raises(WireError, match="4-byte code; this one has 3 bytes"):
        parse_close(b"\x00\x00\x01")
    with pytest.raises(WireError, match="at most 1024 bytes"):
        parse_close(b"\x00" * 4 + b"x" * (MAX_CLOSE_MESSAGE + 1))
    for code in (-1, 2**32):
        with pytest.raises(ValueError, match="32-bit unsigned integer"):
            check_close_code(code)
        with pytest.raises(WireError):
            encode_close(code, "")
    assert parse_close(b"\x00\x00\x00\x02\xff").message == "\ufffd"  # bad UTF-8: replaced


def test_reader_keeps_the_first_well_formed_close() -> None:
    reader = CapsuleReader()
    reader.feed(encode_capsule(CLOSE_WEBTRANSPORT_SESSION, b"\x01"))  # malformed: no code
    assert reader.close is None
    reader.feed(encode_close(3, "first") + encode_close(4, "second"))
    assert reader.close == SessionClose(3, "first")


def test_close_reason_says_who_and_why() -> None:
    assert close_reason("client", None) == "closed by client"
    assert close_reason("server", SessionClose(9, "server bye")) == (
        "closed by server (code 9: server bye)"
    )
    assert close_reason("client", SessionClose(0, "")) == "closed by client (code 0)"


def test_header_map_lowers_names_and_joins_repeats() -> None:
    headers = [(b":path", b"/wt?a=1"), (b"Accept", b"a"), (b"accept", b"b"), (b"x", b"\xe9")]
    assert header_map(headers) == {":path": "/wt?a=1", "accept": "a, b", "x": "é"}


def test_datagrams_queued_counts_what_aioquic_holds() -> None:
    # aioquic 1.7.2 has no public count; an upgrade that renames its private queue fails here.
    quic = QuicConnection(configuration=QuicConfiguration(is_client=True))
    assert datagrams_queued(quic) == 0
    quic.send_datagram_frame(b"one")
    quic.send_datagram_frame(b"two")
    assert datagrams_queued(quic) == 2
    assert datagrams_queued(object()) == 0
