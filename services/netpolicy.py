"""Where the app may open outbound connections: webhook URLs and device receiver addresses.

One rule for both: a host is resolved once, every address it resolves to is checked, and the
connection goes to an address that passed - never to what a second lookup says, since a name
can resolve elsewhere a moment later (DNS rebinding). Numeric forms the C resolver accepts
(`2130706433`, `0x7f000001`, `0177.0.0.1`, `127.1`, `0`) are read as the address they connect
to, and `localhost` (with or without a trailing dot, and its subdomains) is loopback whatever
the resolver says.

Link-local and cloud metadata addresses are refused whatever the settings say:
    webhooks  public addresses only, unless WEBHOOK_ALLOW_PRIVATE_NETWORKS
    devices   only inside DEVICES_ALLOWED_NETWORKS (default: the private ranges; loopback too
              when DEVICES_SIMULATOR_RECEIVERS > 0, the simulator's receivers being there)
"""

from __future__ import annotations

import http.client
import ipaddress
import re
import socket
import ssl
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Why an address may not be connected to, or None when it may.
AddressCheck = Callable[[IPAddress], "str | None"]

# Instance metadata and other addresses through which a server reaches its own platform:
# link-local (169.254.169.254 on AWS, GCP, Azure, OpenStack), Alibaba's 100.100.100.200,
# AWS's IPv6 fd00:ec2::254 and Azure's WireServer 168.63.129.16.
ALWAYS_REFUSED: tuple[Network, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "169.254.0.0/16",
        "fe80::/10",
        "100.100.100.200/32",
        "fd00:ec2::254/128",
        "168.63.129.16/32",
    )
)

DEFAULT_DEVICE_NETWORKS = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128")

# NAT64 (RFC 6052) carries an IPv4 address in its last 32 bits; it is checked as that address.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")

# Host names: dot-separated labels of letters, digits, '-' and '_' (underscores are not in
# RFC 1123 but do occur on LANs, and resolvers accept them), no label starting or ending
# with a hyphen. Internationalised names are checked in their ASCII (IDNA) form.
_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$", re.IGNORECASE)
# What inet_aton may read as an IPv4 address: one to four dot-separated numbers, each
# decimal, octal (leading 0) or hex (0x).
_INET_ATON = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}$", re.IGNORECASE)


class DestinationError(ValueError):
    """A host the app will not connect to; the message says why, for a form or a log."""


class DestinationRefused(DestinationError):
    """The host resolves (or is) an address the policy refuses; retrying will not help."""


class LookupFailed(DestinationError):
    """The host name could not be resolved; it may resolve later."""


# ---------------------------------------------------------------- names and addresses


def normalise_host(host: str) -> str:
    """Lower case, without IPv6 brackets or a trailing dot; DestinationError when it is not a
    host name or an IP address."""
    text = (host or "").strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    # One trailing dot marks a fully qualified name: the same host.
    name = text.lower()[:-1] if text.endswith(".") else text.lower()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            name = ""
    if not _HOST_NAME.match(name):
        raise DestinationError(f"{host[:100]!r} is not a valid host name or IP address.")
    return name


def literal_address(host: str) -> IPAddress | None:
    """The address a numeric host means, in every form the C resolver accepts; None for names."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    if _INET_ATON.match(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _is_localhost(name: str) -> bool:
    # RFC 6761: localhost and its subdomains are loopback, whatever a resolver answers.
    return name == "localhost" or name.endswith(".localhost")


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` stands for, from one lookup; LookupFailed when there is none."""
    name = normalise_host(host)
    literal = literal_address(name)
    if literal is not None:
        return [literal]
    if _is_localhost(name):
        return [ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1")]
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise LookupFailed(f"The host name {name!r} could not be resolved ({reason}).") from None
    addresses: list[IPAddress] = []
    for info in infos:
        try:
            address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        except ValueError:
            continue
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise LookupFailed(f"The host name {name!r} could not be resolved (no addresses).")
    return addresses


def _effective(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv4-mapped or NAT64 IPv6 address reaches."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def always_refused(address: IPAddress) -> bool:
    effective = _effective(address)
    return any(effective in network for network in ALWAYS_REFUSED if _same(effective, network))


def _same(address: IPAddress, network: Network) -> bool:
    return address.version == network.version


METADATA_REFUSED = (
    "{address} is a link-local or cloud metadata address; connections there are always refused."
)


# ---------------------------------------------------------------- webhooks

PRIVATE_REFUSED = (
    "The URL points into a private network ({address}); webhooks only go to public addresses "
    "(WEBHOOK_ALLOW_PRIVATE_NETWORKS allows them)."
)


def webhook_address_problem(address: IPAddress, allow_private: bool) -> str | None:
    """Why a webhook may not be sent to `address`, or None."""
    effective = _effective(address)
    if always_refused(address):
        return METADATA_REFUSED.format(address=address)
    if effective.is_multicast or (
        isinstance(effective, ipaddress.IPv4Address) and effective == _BROADCAST
    ):
        return f"{address} is a multicast or broadcast address; webhooks cannot go there."
    if not allow_private and (not effective.is_global or effective.is_unspecified):
        return PRIVATE_REFUSED.format(address=address)
    return None


def webhook_checker(config: Mapping[str, Any]) -> Callable[[IPAddress], str | None]:
    allow_private = bool(config.get("WEBHOOK_ALLOW_PRIVATE_NETWORKS"))
    return lambda address: webhook_address_problem(address, allow_private)


# ---------------------------------------------------------------- device endpoints


def parse_networks(text: str | Iterable[str]) -> tuple[Network, ...]:
    """Comma or space separated CIDRs; ValueError naming the one that is not."""
    parts = re.split(r"[,\s]+", text) if isinstance(text, str) else list(text)
    networks = []
    for part in parts:
        if part:
            try:
                networks.append(ipaddress.ip_network(part.strip(), strict=False))
            except ValueError:
                raise ValueError(f"Not a network (CIDR): {part!r}.") from None
    return tuple(networks)


def device_networks(config: Mapping[str, Any]) -> tuple[Network, ...]:
    """DEVICES_ALLOWED_NETWORKS, or the private ranges; plus loopback while the app runs
    simulated receivers (they listen on 127.0.0.1)."""
    configured = (config.get("DEVICES_ALLOWED_NETWORKS") or "").strip()
    networks = parse_networks(configured or DEFAULT_DEVICE_NETWORKS)
    if int(config.get("DEVICES_SIMULATOR_RECEIVERS") or 0) > 0:
        networks += parse_networks(LOOPBACK_NETWORKS)
    return networks


def device_address_problem(address: IPAddress, config: Any) -> str | None:
    """Why a poller may not connect to `address` under `config` (a mapping or a Config)."""
    if not isinstance(config, Mapping):
        config = vars(config)
    return device_problem(address, device_networks(config))


def device_problem(address: IPAddress, networks: Sequence[Network]) -> str | None:
    if always_refused(address):
        return METADATA_REFUSED.format(address=address)
    effective = _effective(address)
    if any(effective in network for network in networks if _same(effective, network)):
        return None
    return (
        f"{address} is outside the networks receivers may be reached in (DEVICES_ALLOWED_NETWORKS)."
    )


def device_checker(config: Mapping[str, Any]) -> Callable[[IPAddress], str | None]:
    networks = device_networks(config)
    return lambda address: device_problem(address, networks)


# ---------------------------------------------------------------- checking and connecting


def checked_addresses(
    host: str, port: int, problem: Callable[[IPAddress], str | None]
) -> list[IPAddress]:
    """Resolve once and check every address; the ones to connect to, in order.

    Every address must pass, not just one: which one a client ends up using is not ours to
    choose when the first is down."""
    addresses = resolve(host, port)
    for address in addresses:
        reason = problem(address)
        if reason:
            raise DestinationRefused(reason)
    return addresses


def connect(addresses: Sequence[IPAddress], port: int, timeout: float | None) -> socket.socket:
    """A TCP connection to the first of these (already checked) addresses that answers."""
    last_error: OSError | None = None
    for address in addresses:
        try:
            return socket.create_connection((str(address), port), timeout=timeout)
        except OSError as exc:
            last_error = exc
    raise last_error or OSError("no address to connect to")


class PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to checked addresses; `host` only names the server (Host header)."""

    def __init__(
        self, host: str, port: int, addresses: Sequence[IPAddress], timeout: float
    ) -> None:
        super().__init__(host, port, timeout=timeout)
        self.pinned_addresses = tuple(addresses)

    def connect(self) -> None:
        self.sock = connect(self.pinned_addresses, self.port, self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to checked addresses; SNI and the certificate check use `host`, the URL's name."""

    def __init__(
        self,
        host: str,
        port: int,
        addresses: Sequence[IPAddress],
        timeout: float,
        context: ssl.SSLContext | None = None,
    ) -> None:
        self.tls_context = context or ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self.tls_context)
        self.pinned_addresses = tuple(addresses)

    def connect(self) -> None:
        sock = connect(self.pinned_addresses, self.port, self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.sock = self.tls_context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
