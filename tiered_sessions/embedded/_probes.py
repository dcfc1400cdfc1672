"""Readiness probes: is the server up, and is it ours?

Rule: a probe returns when the server serves requests and raises ``ProbeError`` or ``OSError`` while it does
not (yet); the caller polls until its deadline.
"""

from __future__ import annotations

import socket
import struct
from io import BufferedReader


class ProbeError(Exception):
    """The server answered the readiness probe, but not (yet) with success."""


def redis_ready(host: str, port: int, *, password: str | None, pid: int) -> None:
    """PING answered by the redis-server with process id ``pid`` (not someone who grabbed the port first)."""
    with socket.create_connection((host, port), timeout=0.5) as sock, sock.makefile("rb") as reader:
        if password and _redis_call(sock, reader, "AUTH", password) != b"OK":
            raise ProbeError("AUTH was refused")
        if _redis_call(sock, reader, "PING") != b"PONG":
            raise ProbeError("PING did not answer PONG")
        info = _redis_call(sock, reader, "INFO", "server").decode(errors="replace")
        if f"process_id:{pid}\r\n" not in info:
            raise ProbeError(f"port {port} is answered by another Redis process")


def postgres_ready(host: str, port: int) -> None:
    """SELECT 1 as user postgres (trust authentication) answers 1."""
    _pg_select_one(host, port, timeout=1.0)


def _read_exact(reader: BufferedReader, size: int) -> bytes:
    data = reader.read(size)
    if len(data) != size:
        raise ConnectionError("connection closed by server")
    return data


def _redis_call(sock: socket.socket, reader: BufferedReader, *args: str) -> bytes:
    """One RESP command; enough protocol for PING and INFO."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        encoded = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(encoded), encoded))
    sock.sendall(b"".join(parts))
    line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed by server")
    kind, body = line[:1], line[1:-2]
    if kind in (b"+", b":"):
        return body
    if kind == b"-":
        raise ProbeError(body.decode(errors="replace"))  # e.g. "LOADING Redis is loading the dataset"
    if kind == b"$":
        size = int(body)
        return b"" if size < 0 else _read_exact(reader, size + 2)[:-2]
    raise ProbeError(f"unexpected Redis reply {line!r}")


def _pg_message(reader: BufferedReader) -> tuple[bytes, bytes]:
    header = _read_exact(reader, 5)
    (length,) = struct.unpack("!i", header[1:])
    return header[:1], _read_exact(reader, length - 4)


def _pg_error_text(payload: bytes) -> str:
    fields = {chunk[:1]: chunk[1:].decode(errors="replace") for chunk in payload.split(b"\0") if chunk}
    return f"{fields.get(b'S', 'ERROR')} {fields.get(b'C', '?????')}: {fields.get(b'M', '')}"


def _pg_select_one(host: str, port: int, timeout: float) -> None:
    """Connect over TCP as postgres (trust auth) and run SELECT 1 with the v3 wire protocol.

    Raises OSError when nothing accepts connections, ProbeError while the server answers with an error
    (e.g. 57P03 "the database system is starting up" during crash recovery).
    """
    with socket.create_connection((host, port), timeout=timeout) as sock, sock.makefile("rb") as reader:
        params = b"user\0postgres\0database\0postgres\0\0"
        body = struct.pack("!i", 196608) + params  # protocol 3.0
        sock.sendall(struct.pack("!i", len(body) + 4) + body)
        while True:
            kind, payload = _pg_message(reader)
            if kind == b"R" and struct.unpack("!i", payload[:4])[0] != 0:
                raise ProbeError(f"server on port {port} asks for a password; expected trust authentication")
            if kind == b"E":
                raise ProbeError(_pg_error_text(payload))
            if kind == b"Z":
                break
        query = b"SELECT 1\0"
        sock.sendall(b"Q" + struct.pack("!i", len(query) + 4) + query)
        value: bytes | None = None
        while True:
            kind, payload = _pg_message(reader)
            if kind == b"E":
                raise ProbeError(_pg_error_text(payload))
            if kind == b"D":  # DataRow: int16 columns, int32 length, value
                (size,) = struct.unpack("!i", payload[2:6])
                value = payload[6:6 + size]
            if kind == b"Z":
                break
        sock.sendall(b"X" + struct.pack("!i", 4))
        if value != b"1":
            raise ProbeError(f"SELECT 1 returned {value!r}")
