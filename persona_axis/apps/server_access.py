"""Who may use the server, and how much: API keys (only their SHA-256 digests kept, compared in constant time,
named by a key id in logs and metrics), the refusal to serve beyond loopback without one, and request bodies
read within a size and a time limit."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from persona_axis.apps.server import ServerLimits
from persona_axis.errors import PersonaAxisError

API_KEY_ENV = "PERSONA_AXIS_API_KEY"  # `persona-axis serve` reads one key from this variable
ANONYMOUS = "anonymous"  # the key id of every client of a server without keys


class ApiKeys:
    """The bearer keys a server accepts (none: no authentication). Only SHA-256 digests are kept; a key is
    named in logs and metrics by its id, "key-" and the digest's first 8 hex digits."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self.digests: dict[bytes, str] = {}
        for key in keys:
            if not key or key != key.strip() or any(c.isspace() for c in key):
                raise PersonaAxisError("an API key must be a non-empty string without spaces")
            digest = hashlib.sha256(key.encode()).digest()
            self.digests[digest] = "key-" + digest.hex()[:8]

    def __bool__(self) -> bool:
        return bool(self.digests)

    def identify(self, authorization: str | None) -> str | None:
        """The key id for an Authorization header's value, or None for a missing or unknown key. Every known
        digest is compared, in constant time, whatever matches."""
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return None
        digest = hashlib.sha256(presented.strip().encode()).digest()
        found = None
        for known, key_id in self.digests.items():
            if hmac.compare_digest(known, digest):
                found = key_id
        return found

    @classmethod
    def gather(cls, keys: Iterable[str] = (), env_key: str | None = None, key_file: str | Path | None = None) -> ApiKeys:
        """Keys given directly, one from an environment variable's value, and those of a file: one key a line,
        blank lines and lines starting with # ignored."""
        every = [*keys, *([env_key] if env_key else [])]
        if key_file is not None:
            try:
                lines = Path(key_file).read_text().splitlines()
            except OSError as exc:
                raise PersonaAxisError(f"cannot read the API key file {key_file}: {exc.strerror}") from None
            listed = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
            if not listed:
                raise PersonaAxisError(f"the API key file {key_file} has no keys (one a line; # starts a comment)")
            every += listed
        return cls(every)


def is_loopback(host: str) -> bool:
    """Whether every address `host` stands for is a loopback one (127.0.0.0/8, ::1; names resolved locally)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def check_exposure(host: str, keys: ApiKeys, allow_unauthenticated: bool = False) -> None:
    """Refuse (one line) to serve an address beyond loopback without a key, unless explicitly allowed."""
    if not keys and not allow_unauthenticated and not is_loopback(host):
        raise PersonaAxisError(f"refusing to listen on {host or 'every address'} without an API key: give --api-key, "
                               f"${API_KEY_ENV} or --api-key-file, or --allow-unauthenticated to serve anyone who "
                               "can reach it")


class Refused(Exception):
    """A request body the server will not take: HTTP `status` with a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def read_body(http: Any, limits: ServerLimits) -> bytes:
    """The body, read piece by piece: 413 past `max_body` (at once when Content-Length says so), 408 when it
    has not all arrived within `read_timeout_s`."""
    from starlette.requests import ClientDisconnect

    declared = http.headers.get("content-length")
    too_large = Refused(413, f"the request body is larger than the server's limit of {limits.max_body} bytes")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body:
        raise too_large
    body = bytearray()
    deadline = time.monotonic() + limits.read_timeout_s
    pieces = http.stream()
    try:
        while True:
            try:
                body += await asyncio.wait_for(anext(pieces), max(0.0, deadline - time.monotonic()))
            except StopAsyncIteration:
                return bytes(body)
            except TimeoutError:
                raise Refused(408, f"the request body did not arrive within {limits.read_timeout_s:g} s") from None
            except ClientDisconnect:
                raise Refused(400, "the client went away before sending the whole body") from None
            if len(body) > limits.max_body:
                raise too_large
    finally:
        await pieces.aclose()
