"""Miner address specs: single IPs, ranges `a-b`, CIDRs. Pure functions."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator

# A /16 is already 65k addresses; anything larger is almost certainly a typo in a site config.
MAX_ADDRESSES_PER_SPEC = 65_536


def validate_spec(spec: str) -> str:
    """Raise ValueError with a message a person can act on if `spec` is not an address, range or CIDR."""
    count = sum(1 for _ in _expand_one(spec, limit=MAX_ADDRESSES_PER_SPEC + 1))
    if count > MAX_ADDRESSES_PER_SPEC:
        raise ValueError(f"{spec!r} covers more than {MAX_ADDRESSES_PER_SPEC} addresses")
    return spec


def expand(specs: Iterable[str]) -> list[str]:
    """Every address the specs name, in order, without duplicates."""
    seen: dict[str, None] = {}
    for spec in specs:
        for ip in _expand_one(spec, limit=MAX_ADDRESSES_PER_SPEC):
            seen.setdefault(ip, None)
    return list(seen)


def _expand_one(spec: str, limit: int) -> Iterator[str]:
    text = spec.strip()
    try:
        if "/" in text:
            net = ipaddress.IPv4Network(text, strict=False)
            hosts = net.hosts() if net.prefixlen < 31 else iter(net)
            for n, ip in enumerate(hosts):
                if n >= limit:
                    return
                yield str(ip)
            return
        if "-" in text:
            first_s, last_s = (part.strip() for part in text.split("-", 1))
            first = ipaddress.IPv4Address(first_s)
            last = ipaddress.IPv4Address(last_s) if "." in last_s else _same_prefix(first, last_s)
            if last < first:
                raise ValueError(f"range {spec!r} ends before it starts")
            for n in range(min(int(last) - int(first) + 1, limit)):
                yield str(first + n)
            return
        yield str(ipaddress.IPv4Address(text))
    except ipaddress.AddressValueError as exc:
        raise ValueError(f"{spec!r} is not an IPv4 address, range a-b or CIDR: {exc}") from None
    except ipaddress.NetmaskValueError as exc:
        raise ValueError(f"{spec!r} has a bad netmask: {exc}") from None


def _same_prefix(first: ipaddress.IPv4Address, last_octet: str) -> ipaddress.IPv4Address:
    """`10.0.0.5-20`: the short form of a range within one /24."""
    head = str(first).rsplit(".", 1)[0]
    return ipaddress.IPv4Address(f"{head}.{last_octet}")
