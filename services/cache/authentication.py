"""Authenticated cache values: an HMAC-SHA256 tag over key and value, with a secret shared by every reader and
writer of one cache, so that whoever can write to the backend without the secret cannot plant targets.

The secret comes from the environment, never from a command line or a config file that might be shared:
`EKD_CACHE_HMAC_KEY` holds it, or `EKD_CACHE_HMAC_KEY_FILE` names a file that holds it (a mounted Kubernetes
Secret, say); `open_store` picks it up, so authentication is on wherever a secret is configured.

A stored value is then `frame || tag`: the codec's (or the compact form's) frame as before, and 16 bytes of
HMAC-SHA256(secret, len(key) || key || frame). 16 bytes (128 bits) is the truncation RFC 4868 uses for
HMAC-SHA-256-128 and what NIST SP 800-107 allows: a forger who never sees the secret must guess a tag, each
guess checked only when a reader happens to read it, with probability 2^-128 per guess; collisions do not
help, since the secret is unknown. The 16 bytes make a compact frame 79 bytes instead of 63 for 1000 classes.

Every reader and writer of one cache must agree: a store with the secret reads a value without a valid tag
(unauthenticated, forged, or under another key) as corrupt, and a store without it reads a tagged value as
corrupt (its frame has 16 extra bytes); both delete it and report a miss.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Mapping
from pathlib import Path

from services.core.errors import ConfigError

HMAC_KEY_ENV = "EKD_CACHE_HMAC_KEY"
HMAC_KEY_FILE_ENV = "EKD_CACHE_HMAC_KEY_FILE"
TAG_BYTES = 16
MIN_KEY_BYTES = 16
"""A shorter secret is refused: guessing it would be easier than guessing a tag."""


def hmac_key_from_environment(environ: Mapping[str, str] | None = None) -> bytes | None:
    """The cache's HMAC secret from `EKD_CACHE_HMAC_KEY` or the file `EKD_CACHE_HMAC_KEY_FILE` names (one
    trailing newline dropped); None when neither is set. ConfigError names the variable that is wrong; the
    secret itself is never part of a message."""
    variables = os.environ if environ is None else environ
    inline, path = variables.get(HMAC_KEY_ENV), variables.get(HMAC_KEY_FILE_ENV)
    if inline and path:
        raise ConfigError(f"set one of {HMAC_KEY_ENV} and {HMAC_KEY_FILE_ENV}, not both")
    if path:
        try:
            secret = Path(path).read_bytes().removesuffix(b"\n")
        except OSError as error:
            raise ConfigError(
                f"{HMAC_KEY_FILE_ENV} names {path}, which cannot be read: {error.strerror}"
            ) from None
        source = f"the file {HMAC_KEY_FILE_ENV} names ({path})"
    elif inline:
        secret, source = inline.encode(), HMAC_KEY_ENV
    else:
        return None
    if len(secret) < MIN_KEY_BYTES:
        raise ConfigError(
            f"the cache HMAC secret in {source} has {len(secret)} bytes; use at least {MIN_KEY_BYTES} "
            "random bytes (e.g. `openssl rand -hex 32`)"
        )
    return secret


class ValueAuthenticator:
    """Tags and verifies values under one secret."""

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes) or len(secret) < MIN_KEY_BYTES:
            raise ValueError(f"the HMAC secret must be at least {MIN_KEY_BYTES} bytes")
        self._keyed = hmac.new(secret, digestmod=hashlib.sha256)

    def tag(self, key: bytes, frame: bytes | memoryview) -> bytes:
        mac = self._keyed.copy()  # the secret's inner and outer pads are hashed once, not per value
        mac.update(struct.pack("<Q", len(key)))
        mac.update(key)
        mac.update(frame)
        return mac.digest()[:TAG_BYTES]

    def sign(self, key: bytes, frame: bytes) -> bytes:
        """The stored form of `frame` under `key`: the frame and its tag."""
        return frame + self.tag(key, frame)

    def verified_frame(self, key: bytes, stored: bytes | memoryview) -> memoryview | None:
        """The frame of a stored value whose tag is right for `key`; None otherwise."""
        view = memoryview(stored)
        if len(view) <= TAG_BYTES:
            return None
        frame, tag = view[:-TAG_BYTES], view[-TAG_BYTES:]
        return frame if hmac.compare_digest(self.tag(key, frame), tag) else None
