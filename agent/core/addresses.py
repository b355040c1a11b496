"""Miner address specs: single IPs, ranges `a-b`, CIDRs. Pure functions.

Every spec is one contiguous run of addresses (`span`), so sizes and overlaps are arithmetic: a config is checked
without expanding it, however large it claims to be.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator

# A /16 is already 65k addresses; anything larger is almost certainly a typo in a site config.
MAX_ADDRESSES_PER_SPEC = 65_536
# The same bound for a whole list (miners.addresses, a circuit's miners, ...): 256 /16s are a /8 all the same.
MAX_ADDRESSES_TOTAL = 65_536


def validate_spec(spec: str) -> str:
    """Raise ValueError with a message a person can act on if `spec` is not an address, range or CIDR."""
    if size(spec) > MAX_ADDRESSES_PER_SPEC:
        raise ValueError(f"{spec!r} covers more than {MAX_ADDRESSES_PER_SPEC} addresses")
    return spec


def validate_specs(specs: list[str], limit: int = MAX_ADDRESSES_TOTAL) -> list[str]:
    """Raise ValueError if the specs together name more than `limit` addresses (overlaps counted twice)."""
    total = sum(size(s) for s in specs)
    if total > limit:
        raise ValueError(f"{len(specs)} specs name {total} addresses, more than {limit} addresses in total")
    return specs


def span(spec: str) -> tuple[int, int]:
    """(first, last) address of the spec as integers, both included; a CIDR without its network and broadcast."""
    text = spec.strip()
    try:
        if "/" in text:
            net = ipaddress.IPv4Network(text, strict=False)
            low, high = int(net.network_address), int(net.broadcast_address)
            return (low + 1, high - 1) if net.prefixlen < 31 else (low, high)
        if "-" in text:
            first_s, last_s = (part.strip() for part in text.split("-", 1))
            first = ipaddress.IPv4Address(first_s)
            last = ipaddress.IPv4Address(last_s) if "." in last_s else _same_prefix(first, last_s)
            if last < first:
                raise ValueError(f"range {spec!r} ends before it starts")
            return int(first), int(last)
        one = int(ipaddress.IPv4Address(text))
        return one, one
    except ipaddress.AddressValueError as exc:
        raise ValueError(f"{spec!r} is not an IPv4 address, range a-b or CIDR: {exc}") from None
    except ipaddress.NetmaskValueError as exc:
        raise ValueError(f"{spec!r} has a bad netmask: {exc}") from None


def size(spec: str) -> int:
    first, last = span(spec)
    return last - first + 1


def address(number: int) -> str:
    return str(ipaddress.IPv4Address(number))


def expand(specs: Iterable[str]) -> list[str]:
    """Every address the specs name, in order, without duplicates."""
    seen: dict[str, None] = {}
    for spec in specs:
        for ip in _expand_one(spec, limit=MAX_ADDRESSES_PER_SPEC):
            seen.setdefault(ip, None)
    return list(seen)


def _expand_one(spec: str, limit: int) -> Iterator[str]:
    first, last = span(spec)
    for number in range(first, min(last, first + limit - 1) + 1):
        yield address(number)


def _same_prefix(first: ipaddress.IPv4Address, last_octet: str) -> ipaddress.IPv4Address:
    """`10.0.0.5-20`: the short form of a range within one /24."""
    head = str(first).rsplit(".", 1)[0]
    return ipaddress.IPv4Address(f"{head}.{last_octet}")
