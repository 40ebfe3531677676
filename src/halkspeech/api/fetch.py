"""Fetching audio from a URL a client gave us, without letting it reach what it should not (SSRF).

- only http and https, and no credentials in the URL;
- the host is resolved here and every address it resolves to must be public (not private, loopback,
  link-local, multicast, reserved ...) unless `url_fetch_allow_private`; the connection then goes to that
  checked address (Host header and TLS SNI keep the name), so a second DNS answer cannot swap it (rebinding);
- redirects are followed by hand, each hop checked the same way, at most `url_fetch_max_redirects`;
- nothing of ours is sent: no auth headers, no cookies (not even the ones a redirect sets), no proxy or
  netrc from the environment;
- the body is streamed with a byte limit (PayloadTooLarge), the whole fetch with a time limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from halkspeech import __version__
from halkspeech.config import ServerSettings
from halkspeech.errors import PayloadTooLarge, RequestTimeout, URLFetchError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]
AddressPolicy = Callable[[IPAddress], bool]

_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 1 << 16


# IPv6 prefixes whose last 32 bits are an IPv4 address the packet ends up at: NAT64 (RFC 6052, 8215),
# IPv4-compatible (deprecated) and SIIT's IPv4-translated form. ipaddress counts some of them as global.
_EMBEDDING_V4 = tuple(
    ipaddress.IPv6Network(net) for net in ("64:ff9b::/96", "64:ff9b:1::/48", "::/96", "::ffff:0:0:0/96")
)


def is_public(address: IPAddress) -> bool:
    """Whether an address is on the public internet (not private, loopback, link-local, CGNAT, multicast ...).
    An IPv6 address that carries an IPv4 one (mapped, 6to4, Teredo, NAT64 ...) is judged by that IPv4 address,
    since a gateway delivers it there: 64:ff9b::a9fe:a9fe is the cloud metadata address 169.254.169.254."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return is_public(address.ipv4_mapped)
        if address.sixtofour is not None:
            return is_public(address.sixtofour)
        if address.teredo is not None:
            return all(is_public(part) for part in address.teredo)
        if any(address in net for net in _EMBEDDING_V4):
            return is_public(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if address.is_site_local:
            return False
    return address.is_global and not address.is_multicast


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to (A and AAAA), without blocking the event loop."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise URLFetchError(f"cannot resolve the URL's host {host!r}: {exc.strerror}") from None
    except UnicodeError:  # the idna codec: an empty label ("a..b") or one over 63 characters
        raise URLFetchError(f"the URL's host {host[:200]!r} is not a valid host name") from None
    return list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos))


@dataclass(frozen=True)
class Fetched:
    data: bytes
    url: str  # after redirects
    content_type: str | None


class URLFetcher:
    """Fetches one URL at a time per call; safe to share."""

    def __init__(
        self,
        settings: ServerSettings,
        *,
        resolver: Resolver = resolve,
        policy: AddressPolicy | None = None,
    ) -> None:
        self.max_bytes = int(settings.max_upload_mb * 1e6)
        self.timeout_s = settings.url_fetch_timeout_s
        self.max_redirects = settings.url_fetch_max_redirects
        self.resolver = resolver
        self.policy: AddressPolicy = policy or ((lambda _: True) if settings.url_fetch_allow_private else is_public)

    async def fetch(self, url: str) -> Fetched:
        """GET `url` (following checked redirects) → its body; URLFetchError, PayloadTooLarge, RequestTimeout."""
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._fetch(url)
        except TimeoutError:
            raise RequestTimeout(f"fetching the URL took longer than {self.timeout_s:g} s") from None

    async def _fetch(self, url: str) -> Fetched:
        timeout = httpx.Timeout(self.timeout_s, connect=min(10.0, self.timeout_s))
        headers = {
            "User-Agent": f"halkspeech/{__version__}",
            "Accept": "audio/*, video/*, */*;q=0.5",
            "Accept-Encoding": "identity",  # audio is compressed already; see _read for servers that send gzip
        }
        async with httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=timeout) as client:
            current = _parse(url)
            for _ in range(self.max_redirects + 1):
                address = await self._checked_address(current)
                client.cookies.clear()  # a cookie set by one hop is never sent to the next
                request = client.build_request(
                    "GET",
                    current.copy_with(host=_host_literal(address)),
                    headers={**headers, "Host": _host_header(current)},
                    extensions={"sni_hostname": current.host} if current.scheme == "https" else {},
                )
                try:
                    response = await client.send(request, stream=True)
                except httpx.HTTPError as exc:
                    raise URLFetchError(f"could not fetch the URL: {_describe(exc)}") from None
                except UnicodeError:  # httpx reads a redirect's Location into a URL even when not following it
                    raise URLFetchError("the URL redirected to an invalid address") from None
                async with contextlib.aclosing(response):
                    if response.status_code in _REDIRECTS:
                        current = self._next_hop(current, response)
                        continue
                    if response.status_code != 200:
                        raise URLFetchError(f"fetching the URL failed: the server answered HTTP {response.status_code}")
                    data = await self._read(response)
                    return Fetched(data, str(current), response.headers.get("content-type"))
        raise URLFetchError(f"the URL redirected more than {self.max_redirects} times")

    async def _checked_address(self, url: httpx.URL) -> IPAddress:
        host = url.host
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            addresses = await self.resolver(host, url.port or (443 if url.scheme == "https" else 80))
        if not addresses:
            raise URLFetchError(f"the URL's host {host!r} has no address")
        refused = [a for a in addresses if not self.policy(a)]
        if refused:
            raise URLFetchError(
                f"the URL's host {host!r} resolves to {refused[0]}, a private, loopback or otherwise non-public "
                "address; only public addresses may be fetched"
            )
        return addresses[0]

    def _next_hop(self, current: httpx.URL, response: httpx.Response) -> httpx.URL:
        location = response.headers.get("location")
        if not location:
            raise URLFetchError(f"the URL answered HTTP {response.status_code} without a Location to follow")
        try:
            return _parse(str(current.join(location)))
        except httpx.InvalidURL:
            raise URLFetchError("the URL redirected to an invalid address") from None

    async def _read(self, response: httpx.Response) -> bytes:
        """The body within `max_bytes`, counted as sent and, if compressed, as unpacked: read raw, not through
        httpx's decoders, which unpack each read whole (1.8 KB of gzip inside gzip is a GB of zeros)."""
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise PayloadTooLarge(self._too_large())
        unpack = self._unpacker(response.headers.get("content-encoding", ""))
        chunks: list[bytes] = []
        size = 0
        try:
            async for raw in response.aiter_raw(_CHUNK):
                chunk = unpack(raw, self.max_bytes + 1 - size)  # never past the limit, counting what came
                size += len(chunk)
                if size > self.max_bytes:
                    raise PayloadTooLarge(self._too_large())
                chunks.append(chunk)
        except httpx.HTTPError as exc:
            raise URLFetchError(f"could not read the URL's body: {_describe(exc)}") from None
        except zlib.error:
            raise URLFetchError("the URL's body is not valid gzip/deflate data, as its Content-Encoding says") from None
        return b"".join(chunks)

    def _unpacker(self, encoding: str) -> Callable[[bytes, int], bytes]:
        """One layer of gzip or deflate, unpacked at most `room` bytes a read (past it: PayloadTooLarge); no
        encoding passes bytes through. deflate is zlib-wrapped, or raw where a server sends it so."""
        layers = [e.strip().lower() for e in encoding.split(",") if e.strip().lower() not in ("", "identity")]
        if not layers:
            return lambda raw, room: raw
        if layers not in (["gzip"], ["x-gzip"], ["deflate"]):
            raise URLFetchError(f"the URL's body has a Content-Encoding this server does not unpack: {encoding[:100]}")
        streams = [zlib.decompressobj(wbits=zlib.MAX_WBITS | 32)]  # gzip or zlib wrapper, by its header
        started = False

        def unpack(raw: bytes, room: int) -> bytes:
            nonlocal started
            try:
                out = streams[0].decompress(raw, room)
            except zlib.error:
                if started or layers != ["deflate"]:
                    raise
                streams[0] = zlib.decompressobj(wbits=-zlib.MAX_WBITS)  # raw deflate, no wrapper
                out = streams[0].decompress(raw, room)
            started = True
            if streams[0].unconsumed_tail:  # it would unpack past the limit (room is what is left of it, + 1)
                raise PayloadTooLarge(self._too_large())
            return out

        return unpack

    def _too_large(self) -> str:
        return f"the URL's content is larger than the limit of {self.max_bytes / 1e6:g} MB"


def _parse(url: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url.strip())
        parsed.host  # noqa: B018 - decoding an IDNA host ("xn--...") can fail here, not above
    except (httpx.InvalidURL, TypeError, UnicodeError):
        raise URLFetchError(f"not a valid URL: {url[:200]!r}") from None
    if parsed.scheme not in ("http", "https"):
        raise URLFetchError(f"only http and https URLs can be fetched, not {parsed.scheme or 'a relative URL'!r}")
    if not parsed.host:
        raise URLFetchError("the URL has no host")
    if parsed.userinfo:
        raise URLFetchError("the URL may not carry credentials (user:password@)")
    if parsed.port is not None and not 0 < parsed.port < 65536:  # httpx takes any; the connect then overflowed
        raise URLFetchError(f"the URL's port {parsed.port} is not a TCP port (1 to 65535)")
    return parsed.copy_with(fragment=None)


def _host_literal(address: IPAddress) -> str:
    return str(address)  # httpx brackets IPv6 hosts itself


def _host_header(url: httpx.URL) -> str:
    default = 443 if url.scheme == "https" else 80
    host = f"[{url.host}]" if ":" in url.host else url.host
    return host if url.port in (None, default) else f"{host}:{url.port}"


def _describe(exc: httpx.HTTPError) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
