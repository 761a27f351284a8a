"""ICE on loopback-only and multi-homed hosts, for every aiortc peer Carom runs.

aioice (under aiortc) gathers host candidates from every interface *except* 127.0.0.1, and
Chromium offers only mDNS ``<uuid>.local`` candidates, which aioice cannot resolve on a host without
multicast. So on a machine with only loopback, or when the browser is on the same host, no pair
ever forms. Carom therefore (1) lets the operator name the host addresses aiortc gathers on
(``127.0.0.1`` for a browser on the same machine), and (2) drops the unresolvable ``.local``
candidates from the browser's offer; the browser still reaches our host candidate and aioice
learns the browser's address as peer-reflexive.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

import aioice.ice

_aioice_default = aioice.ice.get_host_addresses
_CANDIDATE = re.compile(r"^a=candidate:\S+ \d+ \S+ \d+ (\S+) ", re.IGNORECASE)


def set_host_addresses(addresses: Sequence[str]) -> None:
    """Make aioice gather host candidates on exactly ``addresses`` (process-wide).

    ``["auto"]`` (or an empty list) restores aioice's own choice: every non-loopback address.
    The setting is process-wide because aioice looks the function up at gather time; a service
    sets it once at start.
    """
    chosen = [a for a in addresses if a != "auto"]
    for a in chosen:
        ipaddress.ip_address(a)  # raises ValueError naming a bad address
    if not chosen:
        aioice.ice.get_host_addresses = _aioice_default
        return

    def configured(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        out = []
        for a in chosen:
            v6 = ipaddress.ip_address(a).version == 6
            if (v6 and use_ipv6) or (not v6 and use_ipv4):
                out.append(a)
        return out

    aioice.ice.get_host_addresses = configured


def strip_mdns_candidates(sdp: str) -> tuple[str, int]:
    """Remove ``a=candidate`` lines whose address is an mDNS name; returns (sdp, removed)."""
    kept: list[str] = []
    removed = 0
    for line in sdp.splitlines(keepends=True):
        m = _CANDIDATE.match(line)
        if m and m.group(1).lower().endswith(".local"):
            removed += 1
            continue
        kept.append(line)
    return "".join(kept), removed
