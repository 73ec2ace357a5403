"""Where the ML backend may fetch a task's image from, and how much of it.

A task names its image by URL, and whoever can create tasks (or call ``/predict``) chooses that URL:
without a rule the backend fetches any address it can reach, a cloud's metadata service or an admin
page on the backend's own network included (server-side request forgery). Label Studio's own
SSRF protection refuses private addresses the same way. The rule here: Label Studio's own origin is
always allowed; any other host only when every address it resolves to is public, or when the user
listed it (``--allow-host``: a MinIO on the LAN, a file server on the same machine). The check runs on
every request the HTTP client sends, so a redirect cannot lead around it.
"""
from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import httpx

from segkit.labelstudio.client import LabelStudioError, origin

# Set by the ML backend for the trainings it starts: a project read by them follows the backend's rule
# (its --allow-host list, comma-separated; empty: Label Studio and public addresses only)
ALLOW_HOSTS_ENV = "SEGKIT_ALLOW_HOSTS"
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def is_public(address: str) -> bool:
    """Whether an IP address is globally routable (not private, loopback, link-local, multicast, ...)."""
    ip = ipaddress.ip_address(address.split("%")[0])  # drop an IPv6 zone ("fe80::1%eth0")
    if isinstance(ip, ipaddress.IPv6Address):  # IPv6 spellings of an IPv4 address are that address
        embedded = ip.ipv4_mapped or ip.sixtofour or (ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
                                                      if ip in _NAT64 or int(ip) >> 32 == 0 else None)
        if embedded is not None:
            ip = embedded
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
        if self.home and origin(url) == origin(self.home):
            return
        host, port = url.host.lower(), url.port or (443 if url.scheme == "https" else 80)
        if host in self.allow_hosts or f"{host}:{port}" in self.allow_hosts:
            return
        try:
            addresses = [str(ipaddress.ip_address(host.strip("[]")))]
        except ValueError:
            addresses = self.resolve(host, port)
        private = [a for a in addresses if not is_public(a)]
        if private:
            raise LabelStudioError(f"refused to fetch from {host}: it is a private, loopback or link-local "
                                   f"address ({private[0]}), and not Label Studio's; if the images really are "
                                   f"there, start the backend with --allow-host {host}")

    def hook(self, request: httpx.Request) -> None:
        """For ``httpx.Client(event_hooks={"request": [...]})``: runs before every request and redirect."""
        self.check(request.url)
