"""URL fetching for /transcribe/url against a local HTTP server: every redirect hop is checked, cookies and
credentials never travel, size and redirect limits hold. The address policy is narrowed to "127.0.0.1 only",
so the local server stands in for a public host and anything else stands in for a private one."""

from __future__ import annotations

import asyncio
import gzip
import http.server
import ipaddress
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from conftest import TEST_DATA
from halkspeech.api.fetch import URLFetcher, is_public
from halkspeech.config import ServerSettings
from halkspeech.errors import PayloadTooLarge, URLFetchError

LJ_BYTES = (TEST_DATA / "LJ001-0002.wav").read_bytes()
GZIP_BOMB = gzip.compress(b"\0" * (64 << 20), compresslevel=1)  # 64 MB of zeros in ~0.3 MB
SEEN: list[dict[str, str]] = []  # request headers the server received, in order


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        SEEN.append(dict(self.headers))
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path == "/audio.wav":
            self._send(200, LJ_BYTES, {"Set-Cookie": "session=abc"})
        elif url.path == "/redirect":
            self._send(302, b"", {"Location": query["to"], "Set-Cookie": "tracking=1; Path=/"})
        elif url.path == "/loop":
            self._send(302, b"", {"Location": "/loop"})
        elif url.path == "/big":
            self._send(200, b"\0" * 300_000)
        elif url.path == "/gzip":  # sent gzipped even though identity was asked for
            self._send(200, gzip.compress(LJ_BYTES), {"Content-Encoding": "gzip"})
        elif url.path == "/gzip-bomb":
            self._send(200, GZIP_BOMB, {"Content-Encoding": "gzip"})
        elif url.path == "/gzip-gzip":  # layers multiply: 1.8 KB of gzip inside gzip can hold a GB of zeros
            self._send(200, gzip.compress(gzip.compress(LJ_BYTES)), {"Content-Encoding": "gzip, gzip"})
        elif url.path == "/raw-deflate":  # "deflate" as some servers send it: no zlib wrapper
            packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
            self._send(200, packer.compress(LJ_BYTES) + packer.flush(), {"Content-Encoding": "deflate"})
        elif url.path == "/br":
            self._send(200, b"\x0b\x02\x80hello\x03", {"Content-Encoding": "br"})
        elif url.path == "/big-chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(6):
                self.wfile.write(b"%x\r\n%s\r\n" % (50_000, b"\0" * 50_000))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self._send(404, b"missing")

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def origin() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def only_localhost(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return address == ipaddress.ip_address("127.0.0.1")


def fetch(url: str, **settings: Any) -> bytes:
    fetcher = URLFetcher(ServerSettings(**settings), policy=only_localhost)
    return asyncio.run(fetcher.fetch(url)).data


def test_fetches_and_follows_a_checked_redirect(origin: str) -> None:
    SEEN.clear()
    assert fetch(f"{origin}/redirect?to=/audio.wav") == LJ_BYTES
    assert len(SEEN) == 2
    # No cookie set by the first hop, no credentials, no proxy headers reach the second.
    assert not {"Cookie", "Authorization", "Proxy-Authorization"} & set(SEEN[1])
    assert SEEN[1]["Host"] == origin.removeprefix("http://")


@pytest.mark.parametrize(
    "target",
    ["http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/a.wav", "http://[::1]/a.wav"],
)
def test_redirect_to_a_private_address_is_refused(origin: str, target: str) -> None:
    SEEN.clear()
    with pytest.raises(URLFetchError, match="non-public address"):
        fetch(f"{origin}/redirect?to={target}")
    assert len(SEEN) == 1  # the refused hop was never requested


def test_limits(origin: str) -> None:
    with pytest.raises(URLFetchError, match="redirected more than 3 times"):
        fetch(f"{origin}/loop", url_fetch_max_redirects=3)
    with pytest.raises(PayloadTooLarge, match=r"larger than the limit of 0\.2 MB"):
        fetch(f"{origin}/big", max_upload_mb=0.2)
    with pytest.raises(PayloadTooLarge):
        fetch(f"{origin}/big-chunked", max_upload_mb=0.2)
    with pytest.raises(URLFetchError, match="HTTP 404"):
        fetch(f"{origin}/nothing-here")


def test_compressed_bodies_are_unpacked_within_the_limit(origin: str) -> None:
    """Identity is asked for; a server that gzips anyway is unpacked one bounded piece at a time, so a body
    that unpacks past the limit is refused at the first piece over it (httpx unpacked each read whole, through
    every layer: 1.8 KB of gzip inside gzip held the server for 10 s and 3 GB)."""
    SEEN.clear()
    assert fetch(f"{origin}/gzip") == LJ_BYTES
    assert fetch(f"{origin}/raw-deflate") == LJ_BYTES
    assert SEEN[0]["Accept-Encoding"] == "identity"
    started = time.perf_counter()
    with pytest.raises(PayloadTooLarge, match=r"larger than the limit of 1 MB"):
        fetch(f"{origin}/gzip-bomb", max_upload_mb=1)
    assert time.perf_counter() - started < 1  # the first 64 KB read unpacks past 1 MB: no further reads
    with pytest.raises(URLFetchError, match="does not unpack: gzip, gzip"):
        fetch(f"{origin}/gzip-gzip")
    with pytest.raises(URLFetchError, match="does not unpack: br"):
        fetch(f"{origin}/br")


@pytest.mark.parametrize("host", ["xn--", "xn--a.com", "a..b", ".com", "a" * 64 + ".com"])
def test_malformed_host_names_are_fetch_errors(origin: str, host: str) -> None:
    """IDNA decoding (httpx) or encoding (getaddrinfo) fails on these: a URLFetchError (400), never a crash,
    whether the client sends them or a redirect does."""
    with pytest.raises(URLFetchError, match="valid"):
        asyncio.run(URLFetcher(ServerSettings()).fetch(f"http://{host}/a.wav"))
    with pytest.raises(URLFetchError, match="valid"):
        fetch(f"{origin}/redirect?to=http://{host}/a.wav")


@pytest.mark.parametrize("port", [0, 65536, 99999])
def test_a_port_out_of_range_is_a_fetch_error(origin: str, port: int) -> None:
    """httpx takes any port into a URL; the connection then failed with OverflowError inside an ExceptionGroup
    (asyncio's loop: a 500) or, under uvloop, as "All connection attempts failed", which says nothing of why."""
    with pytest.raises(URLFetchError, match=f"the URL's port {port} is not a TCP port"):
        fetch(f"http://127.0.0.1:{port}/a.wav")
    with pytest.raises(URLFetchError, match=f"the URL's port {port} is not a TCP port"):
        fetch(f"{origin}/redirect?to=http://127.0.0.1:{port}/a.wav")


def test_default_policy_refuses_loopback(origin: str) -> None:
    with pytest.raises(URLFetchError, match="non-public address"):
        asyncio.run(URLFetcher(ServerSettings()).fetch(f"{origin}/audio.wav"))
    allowed = URLFetcher(ServerSettings(url_fetch_allow_private=True))
    assert asyncio.run(allowed.fetch(f"{origin}/audio.wav")).data == LJ_BYTES


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("172.16.5.4", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("::ffff:8.8.8.8", True),
        # IPv6 forms that carry an IPv4 address: judged by it
        ("::7f00:1", False),  # IPv4-compatible 127.0.0.1
        ("::ffff:0:7f00:1", False),  # IPv4-translated (SIIT)
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 of 169.254.169.254
        ("64:ff9b::7f00:1", False),
        ("64:ff9b:1::a00:1", False),  # local-use NAT64 of 10.0.0.1
        ("64:ff9b::808:808", True),  # NAT64 of 8.8.8.8
        ("2002:7f00:1::1", False),  # 6to4 of 127.0.0.1
        ("2002:808:808::1", True),  # 6to4 of 8.8.8.8
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", False),  # Teredo, client 10.0.0.1
        ("fec0::1", False),  # site-local (deprecated)
    ],
)
def test_is_public(address: str, public: bool) -> None:
    assert is_public(ipaddress.ip_address(address)) is public
