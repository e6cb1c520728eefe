"""`http_get`: fetch a URL with httpx under a timeout and a size cap.

Hosts resolving to private, loopback, link-local or otherwise non-global addresses are refused
unless allowed (a model-written URL must not reach the machine's own network, i.e. no SSRF).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Annotated, Any
from urllib.parse import urlsplit

import anyio
import httpx
from pydantic import Field

from agentrt.tools._tool import Tool, tool

__all__ = ["http_get", "make_http_get"]


async def _check_host(host: str) -> None:
    try:
        addrs = [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        infos = await anyio.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        addrs = [ipaddress.ip_address(info[4][0]) for info in infos]
    for addr in addrs:
        if not _public(addr):
            raise PermissionError(f"refusing to fetch {host!r}: it resolves to non-public address {addr}")


# IPv6 prefixes whose last 32 bits are an IPv4 address: IPv4-compatible (deprecated) and NAT64
_V4_IN_LOW_BITS = [ipaddress.ip_network("::/96"), ipaddress.ip_network("64:ff9b::/96"),
                   ipaddress.ip_network("64:ff9b:1::/48")]


def _public(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A global unicast address, and so is every IPv4 address an IPv6 one carries (mapped, compatible,
    NAT64, 6to4, Teredo): `::169.254.169.254` reaches the same metadata service as 169.254.169.254."""
    if addr.is_multicast or not addr.is_global:
        return False
    if isinstance(addr, ipaddress.IPv6Address):
        inner = [addr.ipv4_mapped, addr.sixtofour, *(addr.teredo or ())]
        inner += [ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF) for net in _V4_IN_LOW_BITS if addr in net]
        return all(_public(v4) for v4 in inner if v4 is not None)
    return True


def make_http_get(
    *,
    allow_private: bool = False,
    max_bytes: int = 1_000_000,
    timeout: float = 10.0,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Tool:
    """Build an `http_get` tool with its own limits (`transport` lets tests serve an in-process app)."""

    @tool(name="http_get", timeout=timeout + 1)
    async def http_get(url: Annotated[str, Field(min_length=1, max_length=2000)]) -> dict[str, Any]:
        """Fetch a web page or API with HTTP GET and return its status, content type and text.

        Args:
            url: the http(s) URL to fetch.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"only http:// and https:// URLs can be fetched, not {url!r}")
        if not allow_private:
            await _check_host(parts.hostname)
        async with httpx.AsyncClient(timeout=timeout, transport=transport, follow_redirects=False) as client:
            async with client.stream("GET", url) as resp:
                body = bytearray()
                truncated = False
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > max_bytes:
                        del body[max_bytes:]
                        truncated = True
                        break
                text = body.decode(resp.encoding or "utf-8", errors="replace")
                return {
                    "status": resp.status_code,
                    "content_type": resp.headers.get("content-type", ""),
                    "text": text,
                    "truncated": truncated,
                    **({"location": resp.headers["location"]} if "location" in resp.headers else {}),
                }

    return http_get


http_get = make_http_get()
