"""Reading untrusted inputs with limits: HTTP without server-side request forgery, local files
that are regular files inside the allowed directories, and one size cap on every read.

HTTP (`http_get`):
  * every address a host resolves to is checked, at connect time, by the connection itself, and
    the socket connects to exactly the addresses that were checked: no second DNS lookup, so no
    DNS-rebinding window. Loopback, link-local (cloud metadata at 169.254.169.254), private,
    shared, multicast, reserved and unspecified addresses (also inside IPv4-mapped, 6to4, Teredo
    and NAT64 IPv6 addresses) are refused unless `http.allow_private_addresses`;
  * redirects are followed here, one at a time (at most `http.max_redirects`), so each target is
    checked like the first URL; only http(s) targets;
  * each attempt has a deadline of `timeout_s` from connect to last byte, enforced by a watchdog
    that shuts the socket down (a server trickling a byte a second cannot stretch it);
  * bodies are capped (`inputs.max_bytes`, from Content-Length when given, while streaming
    otherwise); `Retry-After` is honoured up to `http.max_retry_wait_s`;
  * no proxy or netrc from the environment (requests' trust_env): a URL list must not send
    credentials of the build machine to hosts it names.

Local files (`read_local`, through pippo_common.storage.open_regular): stat first, so a FIFO, a
socket or a device (also behind a symlink) is refused without being opened; then opened with
O_NONBLOCK and checked again (a swap between stat and open cannot make the read block).
"""
from __future__ import annotations

import email.utils
import ipaddress
import os
import socket
import sys
import threading
import time
from urllib.parse import unquote, urljoin, urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (ConnectTimeoutError, HTTPError, NameResolutionError,
                                NewConnectionError)

from dataprep.build_config import HttpConfig
from dataprep.inputs.photos import Rejected
from pippo_common.storage import NotRegularFile, open_regular

RETRY_STATUS = (429, 500, 502, 503, 504)
REDIRECT_STATUS = (301, 302, 303, 307, 308)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_CHUNK = 64 * 1024


# ---- addresses ---------------------------------------------------------------------------------

def address_refusal(address: str) -> str | None:
    """Why an IP address may not be fetched from by default (None: a global unicast address)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "not an IP address"
    if ip.version == 6:
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and address_refusal(str(embedded)):
            return f"{address_refusal(str(embedded))} (embedded {embedded})"
    for kind in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if not ip.is_global:
        return "not globally routable"
    return None


class AddressRefused(Exception):
    """The host resolves to an address the policy refuses (not an OSError: never retried)."""


def resolve_checked(host: str, port: int, allow_private: bool) -> list[tuple]:
    """getaddrinfo of host, every address checked; the list to connect to (all allowed)."""
    host = host.strip("[]")
    infos = socket.getaddrinfo(host, port, urllib3.util.connection.allowed_gai_family(), socket.SOCK_STREAM)
    if not allow_private:
        for *_, sockaddr in infos:
            why = address_refusal(sockaddr[0])
            if why:
                raise AddressRefused(f"address {sockaddr[0]} of {host} is {why}: refused "
                                     "(http.allow_private_addresses allows it)")
    return infos


# ---- connections that check where they connect, and can be cut at a deadline ---------------------

_attempt = threading.local()


class _Attempt:
    """One request's deadline: a watchdog thread shuts down the socket in use when it passes,
    which wakes a read blocked in the fetching thread (connect, TLS handshake, headers or body).

    The socket is known by descriptor and inode (registered when connected or reused): a TLS
    socket takes over the descriptor of the plain one, and the inode check makes sure a closed
    and reused descriptor is never touched."""

    def __init__(self, timeout_s: float):
        self.expired = False
        self._sock_id: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(timeout_s, self._expire)
        self._timer.daemon = True

    def __enter__(self):
        _attempt.current = self
        self._timer.start()
        return self

    def stop(self) -> None:
        """Disarm (before any socket of this attempt is closed)."""
        with self._lock:
            self._timer.cancel()
            self._sock_id = None
        _attempt.current = None

    def __exit__(self, *exc):
        self.stop()

    def register(self, sock) -> None:
        try:
            fd = sock.fileno()
            ino = os.fstat(fd).st_ino
        except (OSError, AttributeError, ValueError):
            return
        with self._lock:
            self._sock_id = (fd, ino)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            if self._sock_id is None:
                return
            fd, ino = self._sock_id
            try:
                if os.fstat(fd).st_ino == ino:
                    dup = socket.socket(fileno=os.dup(fd))
                    try:
                        dup.shutdown(socket.SHUT_RDWR)   # acts on the socket, not the descriptor
                    finally:
                        dup.close()
            except OSError:
                pass


def _register(sock) -> None:
    current = getattr(_attempt, "current", None)
    if current is not None and sock is not None:
        current.register(sock)


class _GuardMixin:
    allow_private = False

    def _new_conn(self) -> socket.socket:
        try:
            infos = resolve_checked(self._dns_host, self.port, self.allow_private)
        except socket.gaierror as e:
            raise NameResolutionError(self.host, self, e) from e
        err = None
        for af, socktype, proto, _, sockaddr in infos:
            sock = socket.socket(af, socktype, proto)
            try:
                for opt in self.socket_options or ():
                    sock.setsockopt(*opt)
                if self.timeout is not None:
                    sock.settimeout(self.timeout)
                if self.source_address:
                    sock.bind(self.source_address)
                _register(sock)
                sock.connect(sockaddr)    # the checked address itself: no second lookup
                sys.audit("http.client.connect", self, self.host, self.port)
                return sock
            except TimeoutError as e:
                sock.close()
                raise ConnectTimeoutError(self, f"connection to {self.host} timed out") from e
            except OSError as e:
                err = e
                sock.close()
        raise NewConnectionError(self, f"Failed to establish a new connection: {err}")

    def request(self, *args, **kwargs):
        _register(self.sock)            # a reused keep-alive connection (a new one registers in _new_conn)
        return super().request(*args, **kwargs)


def _pool_classes(allow_private: bool) -> dict:
    conns = {scheme: type(f"Guarded{base.__name__}", (_GuardMixin, base), {"allow_private": allow_private})
             for scheme, base in (("http", HTTPConnection), ("https", HTTPSConnection))}
    return {scheme: type(f"Guarded{pool.__name__}", (pool,), {"ConnectionCls": conns[scheme]})
            for scheme, pool in (("http", HTTPConnectionPool), ("https", HTTPSConnectionPool))}


_MANAGERS: dict[bool, urllib3.PoolManager] = {}


def _manager(allow_private: bool) -> urllib3.PoolManager:
    if allow_private not in _MANAGERS:
        pm = urllib3.PoolManager(num_pools=32, maxsize=8, retries=False, headers=_manager_headers())
        pm.pool_classes_by_scheme = _pool_classes(allow_private)
        _MANAGERS[allow_private] = pm
    return _MANAGERS[allow_private]


# ---- HTTP GET ----------------------------------------------------------------------------------

class _Transient(Exception):
    """A failure worth another attempt (connection error, timeout before the response)."""


def _retry_after(value: str | None, cap: float) -> float:
    if not value:
        return 0.0
    try:
        wait = float(value)
    except ValueError:
        try:
            wait = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return 0.0
    return max(0.0, min(wait, cap))


def _origin(parts) -> tuple:
    return parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def _auth_headers(url: str, inherited: tuple[str, str] | None) -> dict:
    """Basic auth from the URL's own user:password (as requests did), else the credentials a
    same-origin redirect inherited (requests' rule: never sent to another host, port or scheme)."""
    parts = urlsplit(url)
    headers = dict(_manager_headers())
    creds = (unquote(parts.username), unquote(parts.password or "")) if parts.username is not None else inherited
    if creds is not None:
        headers.update(urllib3.util.make_headers(basic_auth=f"{creds[0]}:{creds[1]}"))
    return headers


def _manager_headers() -> dict:
    return {"User-Agent": "pippo-dataprep", "Accept-Encoding": "identity"}


def _one_attempt(url: str, http: HttpConfig, max_bytes: int, auth: tuple[str, str] | None = None
                 ) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one request; the body only for a 200."""
    pm = _manager(http.allow_private_addresses)
    timeout = urllib3.Timeout(connect=http.timeout_s, read=http.timeout_s)
    attempt = _Attempt(http.timeout_s)
    resp, complete = None, False
    try:
        with attempt:
            resp = pm.request("GET", url, headers=_auth_headers(url, auth), redirect=False, retries=False,
                              preload_content=False, decode_content=False, timeout=timeout)
            if resp.status != 200:
                return resp.status, dict(resp.headers), b""
            length = resp.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise Rejected("fetch", f"body of {int(length)} bytes exceeds inputs.max_bytes ({max_bytes})")
            body = bytearray()
            while not attempt.expired:
                try:
                    chunk = resp.read1(_CHUNK, decode_content=False)
                except (HTTPError, OSError) as exc:
                    if attempt.expired:
                        break
                    raise _Transient(type(exc).__name__) from None
                if not chunk:
                    break
                body += chunk
                if len(body) > max_bytes:
                    raise Rejected("fetch", f"body exceeds inputs.max_bytes ({max_bytes} bytes)")
        if attempt.expired:     # a body still arriving at the deadline: not retried
            raise Rejected("fetch", f"body not complete within timeout_s ({http.timeout_s} s)")
        if length.isdigit() and len(body) != int(length):
            raise _Transient("IncompleteRead")
        complete = True
        return 200, dict(resp.headers), bytes(body)
    except AddressRefused as exc:
        raise Rejected("fetch", str(exc)) from None
    except (HTTPError, OSError) as exc:   # connect/read timeouts, refused connections, protocol errors
        raise _Transient(type(exc).__name__) from None
    finally:
        attempt.stop()                    # disarmed before any socket is closed
        if resp is not None:
            if not complete:
                resp.close()              # never reuse a connection left mid-response
            resp.release_conn()


def http_get(url: str, http: HttpConfig, max_bytes: int) -> bytes:
    """Body of an http(s) URL under the rules of this module; Rejected('fetch', ...) otherwise."""
    retries = redirects = 0
    current = url
    first = urlsplit(url)
    creds = (unquote(first.username), unquote(first.password or "")) if first.username is not None else None
    while True:
        parts = urlsplit(current)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Rejected("fetch", f"redirect to a non-http(s) URL refused ({parts.scheme or 'no'} scheme)")
        inherited = creds if _origin(parts) == _origin(first) else None
        try:
            status, headers, body = _one_attempt(current, http, max_bytes, inherited)
        except _Transient as exc:
            if retries >= http.retries:
                raise Rejected("fetch", f"HTTP error after {retries} retries: {exc}") from None
            time.sleep(http.backoff_s * 2 ** retries)
            retries += 1
            continue
        if status in REDIRECT_STATUS:
            location = headers.get("Location") or headers.get("location")
            if not location:
                raise Rejected("fetch", f"HTTP {status} without a Location")
            redirects += 1
            if redirects > http.max_redirects:
                raise Rejected("fetch", f"more than {http.max_redirects} redirects")
            current = urljoin(current, location)
            continue
        if status in RETRY_STATUS and retries < http.retries:
            wait = _retry_after(headers.get("Retry-After"), http.max_retry_wait_s)
            time.sleep(max(http.backoff_s * 2 ** retries, wait))
            retries += 1
            continue
        if status != 200:
            raise Rejected("fetch", f"HTTP {status}" + (f" after {retries} retries" if retries else ""))
        return body


# ---- local files and objects -------------------------------------------------------------------

def read_capped(f, max_bytes: int, size: int | None = None) -> bytes:
    """Read a whole file object, refusing more than max_bytes (by its size first when known)."""
    if size is not None and size > max_bytes:
        raise Rejected("fetch", f"{size} bytes exceed inputs.max_bytes ({max_bytes})")
    data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise Rejected("fetch", f"more than inputs.max_bytes ({max_bytes}) bytes")
    return data


def read_local(path: str, max_bytes: int) -> bytes:
    try:
        with open_regular(path) as f:
            return read_capped(f, max_bytes, os.fstat(f.fileno()).st_size)
    except FileNotFoundError:
        raise Rejected("fetch", "file not found") from None
    except NotRegularFile:
        raise Rejected("fetch", "not a regular file (FIFO, device, socket or directory)") from None
    except (OSError, ValueError) as exc:   # ValueError: a NUL in the path
        raise Rejected("fetch", f"cannot read ({getattr(exc, 'strerror', None) or type(exc).__name__})") from None


def read_object(fs, path: str, max_bytes: int) -> bytes:
    """An object-store object, its listed size checked before reading, the read bounded."""
    try:
        with fs.open(path, "rb") as f:      # buffered fsspec files know their size (no extra request)
            size = getattr(f, "size", None)
            return read_capped(f, max_bytes, size if isinstance(size, int) else None)
    except FileNotFoundError:
        raise Rejected("fetch", "file not found") from None
    except OSError as exc:
        raise Rejected("fetch", f"cannot read ({exc})") from None


def realpath_inside(path: str, roots) -> bool:
    """Whether `path`, symlinks resolved, lies inside one of `roots` (themselves resolved).
    Existence is not looked at: the answer for a missing file and a forbidden one is the same."""
    try:
        real = os.path.realpath(path)
    except (OSError, ValueError):
        return False
    for root in roots:
        base = os.path.realpath(root)
        if real == base or real.startswith(base.rstrip(os.sep) + os.sep):
            return True
    return False
