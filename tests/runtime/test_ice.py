"""Host-address selection and mDNS candidate stripping (pure)."""

from __future__ import annotations

from collections.abc import Iterator

import aioice.ice
import pytest

from carom_runtime.ice import set_host_addresses, strip_mdns_candidates

OFFER = (
    "v=0\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 96\r\n"
    "a=candidate:1 1 udp 2113937151 1b2c3d4e-aaaa-bbbb-cccc-1234567890ab.local 51000 typ host "
    "generation 0 network-cost 999\r\n"
    "a=candidate:2 1 udp 2113939711 127.0.0.1 51001 typ host generation 0\r\n"
    "a=candidate:3 1 tcp 1518280447 ABCDEF.LOCAL 9 typ host tcptype active\r\n"
    "a=end-of-candidates\r\n"
)


@pytest.fixture
def restore() -> Iterator[None]:
    yield
    set_host_addresses(["auto"])


def test_strip_mdns_candidates_keeps_ip_candidates() -> None:
    sdp, removed = strip_mdns_candidates(OFFER)
    assert removed == 2
    assert ".local" not in sdp.lower()
    assert "127.0.0.1 51001" in sdp
    assert sdp.endswith("a=end-of-candidates\r\n")


def test_strip_is_identity_without_mdns() -> None:
    sdp = "v=0\r\na=candidate:2 1 udp 1 10.1.2.3 5 typ host\r\n"
    assert strip_mdns_candidates(sdp) == (sdp, 0)


def test_set_host_addresses(restore: None) -> None:
    set_host_addresses(["127.0.0.1", "::1"])
    assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False) == ["127.0.0.1"]
    assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True) == ["127.0.0.1", "::1"]
    set_host_addresses(["auto"])
    assert "127.0.0.1" not in aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False)


def test_bad_address_is_refused(restore: None) -> None:
    with pytest.raises(ValueError, match="localhost"):
        set_host_addresses(["localhost"])
