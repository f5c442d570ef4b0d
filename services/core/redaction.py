"""Secrets kept out of messages and logs: the one way ekd prints a location that may carry credentials."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit

_SECRET_QUERY_NAME = re.compile(r"pass|secret|token|auth|cred", re.IGNORECASE)


def redact(location: str) -> str:
    """`location` fit to print. A URL (a cache URI) keeps everything but its password and the value of any
    query parameter whose name suggests a secret (password, secret, token, auth, credential), which become
    "***"; an address (host:port) loses whatever precedes an '@' (user:pass@host:port -> ***@host:port)."""
    if "://" not in location:
        return f"***@{location.rpartition('@')[2]}" if "@" in location else location
    original = parts = urlsplit(location)
    if parts.password is not None:
        user = parts.username or ""
        host = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{user}:***@{host}")
    if parts.query:
        query = parse_qsl(parts.query, keep_blank_values=True)
        if any(_SECRET_QUERY_NAME.search(name) for name, _ in query):
            redacted = [(name, "***" if _SECRET_QUERY_NAME.search(name) else value) for name, value in query]
            parts = parts._replace(query=urlencode(redacted, safe="/*"))
    # geturl() drops an empty netloc (lmdb:///path -> lmdb:/path): a location with nothing to hide is
    # printed as it was given.
    return location if parts == original else parts.geturl()
