"""The simulator's HTTP contract: offer validation (pure)."""

from __future__ import annotations

import msgspec
import pytest

from carom.impairment import Profile
from carom.signaling import OfferRequest, SessionControl, auth_headers

dec = msgspec.json.Decoder(OfferRequest)


def test_minimal_offer() -> None:
    req = dec.decode(b'{"session_id":"a1","sdp":"v=0\\r\\nm=video 9 x\\r\\n"}')
    assert req.type == "offer" and req.params.fps is None


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b'{"sdp":"v=0 0123456789"}', "session_id"),
        (b'{"session_id":"a b","sdp":"v=0 0123456789"}', "$.session_id"),
        (b'{"session_id":"a","sdp":"v=0 0123456789","params":{"fps":0}}', "$.params.fps"),
        (b'{"session_id":"a","sdp":"v=0 0123456789","params":{"fps":1000}}', "$.params.fps"),
        (b'{"session_id":"a","sdp":"v=0 0123456789","params":{"width":641}}', "$.params.width"),
        (b'{"session_id":"a","sdp":"v=0 0123456789","params":{"cor":1.5}}', "$.params.cor"),
        (b'{"session_id":"a","sdp":"v=0 0123456789","params":{"vx":1e9}}', "$.params.vx"),
        (b'{"session_id":"a","sdp":"v=0 0123456789","params":{"spin":1}}', "spin"),
        (b'{"session_id":"a","sdp":"v=0 0123456789","type":"answer"}', "$.type"),
        (b'{"session_id":"a","sdp":"v"}', "$.sdp"),
        (b'{"session_id":"a","sdp":"v=0 0123456789","params":{"latency":"fast"}}', "latency"),
        (b'{"session_id":"a","sdp":"v=0 0123456789","params":{"latency":"90-10"}}', "latency"),
        (b'{"session_id":"a","sdp":"v=0 0123456789","params":{"latency":"5-10"}}', "latency"),
    ],
)
def test_bad_offers_name_the_field(body: bytes, needle: str) -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        dec.decode(body)
    assert needle in str(info.value)


def test_latency_modes_in_an_offer() -> None:
    for mode in ("smooth", "interactive", "0-100", "40950-40950"):
        body = {"session_id": "a", "sdp": "v=0 0123456789", "params": {"latency": mode}}
        assert dec.decode(msgspec.json.encode(body)).params.latency == mode
    assert dec.decode(b'{"session_id":"a","sdp":"v=0 0123456789"}').params.latency is None


def test_auth_headers_carry_the_token_as_a_bearer_and_nothing_without_one() -> None:
    assert auth_headers("s3cret-token-0123") == {"Authorization": "Bearer s3cret-token-0123"}
    assert auth_headers("") == {}


def test_a_live_network_change_is_a_profile_by_name_or_fields_and_a_bad_one_names_its_field() -> (
    None
):
    ctl = msgspec.json.Decoder(SessionControl)
    assert ctl.decode(b'{"network":"lte"}').network == "lte"
    custom = ctl.decode(b'{"network":{"name":"x","media":{"delay_ms":80}}}').network
    assert isinstance(custom, Profile) and custom.media.delay_ms == 80
    with pytest.raises(msgspec.ValidationError, match=r"\$\.network\.reports\.delay_ms"):
        ctl.decode(b'{"network":{"reports":{"delay_ms":-5}}}')
    with pytest.raises(msgspec.ValidationError, match="no profile 'moon'"):
        ctl.decode(b'{"network":"moon"}')
