"""Who may talk to the server, and where it may listen.

Tokens: a token file holds one token per line (`NAME:TOKEN` or a bare token; `#` starts a comment); each token
is one client identity: it owns the jobs it submits, and no other token can see them. Without a file the server
makes one token and prints it. Tokens are compared in constant time (`hmac.compare_digest`, every token tried).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
from pathlib import Path
from typing import Optional

from fewshotsam2.errors import InputError

MIN_TOKEN_LENGTH = 16
TOKEN_ENV = "FEWSHOTSAM2_SERVER_TOKEN"  # the client's alternative to --token-file (the Slicer module uses it)


def generate_token() -> str:
    return secrets.token_urlsafe(32)


def read_tokens(path: str) -> dict[str, str]:
    """token -> client name, from a token file. Refuses short tokens and duplicates."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--token-file {path}: cannot read it ({exc.__class__.__name__})") from None
    tokens: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, token = line.rpartition(":")
        name = name.strip() if sep else f"client{len(tokens) + 1}"
        token = token.strip()
        if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
            raise InputError(f"--token-file {path}, line {n}: a token needs at least {MIN_TOKEN_LENGTH} characters "
                             "and no spaces (make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        if token in tokens:
            raise InputError(f"--token-file {path}, line {n}: the same token twice")
        tokens[token] = name
    if not tokens:
        raise InputError(f"--token-file {path}: no token in it")
    return tokens


def client_token(token_file: Optional[str]) -> str:
    """The client's token: the first token of --token-file, else $FEWSHOTSAM2_SERVER_TOKEN."""
    if token_file:
        return next(iter(read_tokens(token_file)))
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise InputError(f"--server needs a token: --token-file FILE (or ${TOKEN_ENV})")
    return token


class TokenCheck:
    """Constant-time bearer-token check. Identities are digests, so a job record never holds a token."""

    def __init__(self, tokens: dict[str, str]) -> None:
        self._tokens = [(t.encode(), name, hashlib.sha256(t.encode()).hexdigest()[:16]) for t, name in tokens.items()]

    def owner(self, authorization: Optional[str]) -> Optional[str]:
        """The owner id of an `Authorization: Bearer TOKEN` header value, or None when it matches no token."""
        scheme, _, given = (authorization or "").partition(" ")
        given_bytes = given.strip().encode()
        found = None
        for token, _name, owner in self._tokens:  # no early exit: the time does not say which token matched
            if hmac.compare_digest(token, given_bytes) and scheme.lower() == "bearer":
                found = owner
        return found

    def name(self, owner: str) -> str:
        return next((n for _t, n, o in self._tokens if o == owner), "?")


def is_loopback(host: str) -> bool:
    """Whether `host` names only this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
        except OSError:
            return False


def check_listen(host: str, token_file: bool, tls: bool, insecure: bool) -> None:
    """Refuse a non-loopback address without both a token file and TLS unless --insecure is given (a token is
    always required: without --token-file one is made at start)."""
    if is_loopback(host) or insecure:
        return
    if not token_file:
        raise InputError(f"--host {host} is reachable from other machines: give --token-file (the tokens your "
                         "clients use), or --insecure to accept a token made at start")
    if not tls:
        raise InputError(f"--host {host} is reachable from other machines: give --tls-cert and --tls-key (tokens "
                         "would otherwise cross the network in clear text), or --insecure to accept that")
