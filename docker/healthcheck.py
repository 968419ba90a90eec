#!/usr/bin/env python3
"""Container health check with the standard library only (no curl in the images).

    healthcheck.py URL       healthy when GET URL answers 2xx
    healthcheck.py --redis   healthy when the Redis in $REDIS_URL answers PING

Exit status 0 = healthy, 1 = not. Used by docker-compose.yml on each service's
one port (rollout http://127.0.0.1:8000/health, reward :8100/ready, judge
:8200/health); Kubernetes probes call the HTTP endpoints directly.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.error
import urllib.request
from urllib.parse import unquote, urlsplit

TIMEOUT_S = 5.0


def check_http(url: str) -> str | None:
    """None when healthy, else the reason."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return None if 200 <= response.status < 300 else f"status {response.status}"
    except urllib.error.HTTPError as exc:
        return f"status {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return f"unreachable: {exc}"


def _resp_command(*parts: str) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        data = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def check_redis(url: str) -> str | None:
    """PING over RESP (AUTH first when the URL has a password); no client library needed."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        return f"unsupported scheme {parts.scheme!r}"
    if parts.scheme == "rediss":
        return "rediss:// is not supported by this check"
    commands = []
    if parts.password is not None:
        auth = [unquote(parts.username), unquote(parts.password)] if parts.username else [unquote(parts.password)]
        commands.append(_resp_command("AUTH", *auth))
    commands.append(_resp_command("PING"))
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), timeout=TIMEOUT_S) as sock:
            sock.sendall(b"".join(commands))
            reply = b""
            while reply.count(b"\r\n") < len(commands):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
    except OSError as exc:
        return f"unreachable: {exc}"
    last = reply.split(b"\r\n")[len(commands) - 1] if reply.count(b"\r\n") >= len(commands) else reply
    return None if last == b"+PONG" else f"reply {last[:80]!r}"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: healthcheck.py URL | --redis", file=sys.stderr)
        return 2
    if argv[0] == "--redis":
        url = os.environ.get("REDIS_URL")
        reason = check_redis(url) if url else "REDIS_URL is not set"
    else:
        reason = check_http(argv[0])
    if reason:
        print(f"event=unhealthy target={argv[0]} reason={reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
