"""Which ``Host`` names the server answers to (the DNS-rebinding guard, as Jupyter Server has it).

A page served under a foreign name whose DNS later points at this machine would otherwise reach a
server bound to 127.0.0.1 with the browser's blessing: Tornado checks a websocket's ``Origin`` only
against its ``Host``, which the attacker chose. So every request (page, websocket, API) must name this
server: a loopback name, a name given with ``--allow-host``, and on a non-loopback bind the machine's
own names and addresses.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

import psutil

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
ANY_ADDRESSES = frozenset({"", "0.0.0.0", "::"})


def is_loopback(address: str) -> bool:
    """Whether a bind address reaches this machine only (``localhost``, ``127.x``, ``::1``)."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name of a ``Host`` header without its port, lower case (``[::1]:5006`` -> ``::1``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    if header.count(":") == 1:
        return header.split(":", 1)[0]
    return header.rstrip(".")


def machine_names() -> set[str]:
    """This machine's host names and interface addresses."""
    names = {socket.gethostname().lower(), socket.getfqdn().lower()}
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family in (socket.AF_INET, socket.AF_INET6):
                names.add(address.address.split("%", 1)[0].lower())
    return names


@dataclass(frozen=True)
class HostPolicy:
    """The names a server answers to."""

    names: frozenset[str]

    @classmethod
    def for_bind(cls, address: str, allowed: tuple[str, ...] = ()) -> HostPolicy:
        names = set(LOOPBACK_NAMES) | {host_name(name) for name in allowed}
        if not is_loopback(address):
            names |= machine_names()
            if address not in ANY_ADDRESSES:
                names.add(address.lower())
        return cls(frozenset(names))

    def allows(self, host: str | None) -> bool:
        # HTTP/1.0 clients may send no Host: nothing to rebind, nothing to refuse.
        return host is None or host_name(host) in self.names

    def origins(self, port: int) -> list[str]:
        """Bokeh's ``allow_websocket_origin``: the same names, with the port (IPv6 addresses left out: Bokeh's
        list cannot hold them; a page reached by one is refused its websocket, not served to a stranger)."""
        return sorted(f"{name}:{port}" for name in self.names if ":" not in name)
