"""Where the ML backend may fetch a task's image from, and how much of it.

A task names its image by URL, and whoever can create tasks (or call ``/predict``) chooses that URL:
without a rule the backend fetches any address it can reach, a cloud's metadata service or an admin
page on the backend's own network included (server-side request forgery). Label Studio's own
SSRF protection refuses private addresses the same way. The rule here: Label Studio's own origin is
always allowed; any other host only when every address it resolves to is public, or when the user
listed it (``--allow-host``: a MinIO on the LAN, a file server on the same machine). The check runs on
every request the HTTP client sends, so a redirect cannot lead around it, and again where the
connection is opened (:meth:`EgressPolicy.transport`): the name is resolved once, the addresses checked,
and the socket opened to a checked one, so DNS that changes its answer in between (rebinding) cannot
turn a public name private after the check.
"""
from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import httpcore
import httpx

from segkit.labelstudio.client import LabelStudioError, origin

# Set by the ML backend for the trainings it starts: a project read by them follows the backend's rule
# (its --allow-host list, comma-separated; empty: Label Studio and public addresses only)
ALLOW_HOSTS_ENV = "SEGKIT_ALLOW_HOSTS"
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052's well-known prefix
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: a network's own translators, /48 to /96
_SIIT = ipaddress.ip_network("::ffff:0:0:0/96")  # RFC 2765's IPv4-translated addresses
# where RFC 6052 puts the IPv4 address (bytes of the IPv6 one) for each prefix length a /48 may be cut to
_RFC6052 = {48: (slice(6, 8), slice(9, 11)), 56: (slice(7, 8), slice(9, 12)), 64: (slice(9, 13),),
            96: (slice(12, 16),)}


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address stands for (mapped, 6to4, NAT64, SIIT, compatible); [] for none.
    A local-use NAT64 address may embed its IPv4 at any of RFC 6052's positions: all are returned."""
    if ip.ipv4_mapped or ip.sixtofour:
        return [ip.ipv4_mapped or ip.sixtofour]
    if ip in _NAT64 or ip in _SIIT or int(ip) >> 32 == 0:
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    if ip in _NAT64_LOCAL:
        packed = ip.packed
        return [ipaddress.IPv4Address(b"".join(packed[part] for part in parts)) for parts in _RFC6052.values()]
    return []


def is_public(address: str) -> bool:
    """Whether an IP address is globally routable (not private, loopback, link-local, multicast, ...).
    IPv6 spellings of IPv4 addresses are as public as every IPv4 address they may stand for."""
    ip = ipaddress.ip_address(address.split("%")[0])  # drop an IPv6 zone ("fe80::1%eth0")
    embedded = embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else []
    return all(_routable(v4) for v4 in embedded) if embedded else _routable(ip)


def _routable(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return ip.is_global and not ip.is_multicast


def _addresses(host: str, port: int) -> list[str]:
    try:
        return [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
    except (socket.gaierror, UnicodeError) as e:
        raise LabelStudioError(f"cannot resolve {host}: {e}") from None


@dataclass(frozen=True)
class EgressPolicy:
    """Which URLs the backend fetches: ``home`` (Label Studio's URL), listed hosts, and public addresses."""

    home: str | None = None
    allow_hosts: frozenset[str] = field(default_factory=frozenset)  # "host" or "host:port", lower case
    resolve: Callable[[str, int], list[str]] = _addresses

    @classmethod
    def create(cls, home: str | None, allow_hosts: Iterable[str] = ()) -> "EgressPolicy":
        return cls(home, frozenset(h.strip().lower() for h in allow_hosts if h.strip()))

    def check(self, url: str | httpx.URL) -> None:
        """Raise :class:`LabelStudioError` saying why, unless the backend may fetch ``url``."""
        url = httpx.URL(str(url))
        if url.scheme not in ("http", "https"):
            raise LabelStudioError(f"refused to fetch a {url.scheme or 'relative'} URL: only http(s)")
        if not (self.home and origin(url) == origin(self.home)):
            self.address(url.host, url.port or (443 if url.scheme == "https" else 80))

    def address(self, host: str, port: int) -> str:
        """Where to connect for ``host:port``: the host itself when it is trusted (Label Studio's, or listed),
        else the first of its addresses once every one is checked public; raises :class:`LabelStudioError`."""
        host = host.lower()
        home = httpx.URL(self.home) if self.home else None
        if home and (home.host.lower(), home.port or (443 if home.scheme == "https" else 80)) == (host, port):
            return host
        if host in self.allow_hosts or f"{host}:{port}" in self.allow_hosts:
            return host
        try:
            addresses = [str(ipaddress.ip_address(host.strip("[]")))]
        except ValueError:
            addresses = self.resolve(host, port)
        private = [a for a in addresses if not is_public(a)]
        if private or not addresses:
            raise LabelStudioError(f"refused to fetch from {host}: it is a private, loopback or link-local "
                                   f"address ({private[0] if private else 'none found'}), and not Label Studio's; "
                                   f"if the images really are there, start the backend with --allow-host {host}")
        return addresses[0]

    def transport(self) -> httpx.HTTPTransport:
        """An httpx transport whose sockets go only to addresses :meth:`address` checked, resolved once."""
        return _CheckedTransport(self)

    def hook(self, request: httpx.Request) -> None:
        """For ``httpx.Client(event_hooks={"request": [...]})``: runs before every request and redirect."""
        self.check(request.url)


class _CheckedNetwork(httpcore.SyncBackend):
    """httpcore's sockets, opened to the address the policy checked (TLS still verifies the host's name)."""

    def __init__(self, policy: EgressPolicy):
        self.policy = policy

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options=None) -> httpcore.NetworkStream:
        return super().connect_tcp(self.policy.address(host, port), port, timeout, local_address, socket_options)


class _CheckedTransport(httpx.HTTPTransport):
    def __init__(self, policy: EgressPolicy):
        super().__init__()
        # httpx takes no network backend: the same pool as its own, with the checked one
        self._pool = httpcore.ConnectionPool(ssl_context=httpx.create_ssl_context(),
                                             network_backend=_CheckedNetwork(policy))
