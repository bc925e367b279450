"""Bearer-token checks shared by HTTP and gRPC: constant-time, reloadable from a file."""

from __future__ import annotations

import hmac
import logging
import os

from sidecar.config import ConfigError, read_token_file

log = logging.getLogger(__name__)


class TokenChecker:
    """Accepts ``Bearer <token>`` (scheme case-insensitive) for any configured token.

    With a token file, the file is re-read when its mtime changes, so a
    rotated Kubernetes Secret takes effect without a restart.
    """

    def __init__(self, tokens: tuple[str, ...] = (), file: str = "") -> None:
        self._static = tuple(t.encode() for t in tokens)
        self._file = file
        self._file_seen: tuple[int, int, int] | None = None  # (mtime_ns, size, inode) last read
        self._from_file: tuple[bytes, ...] = ()
        self._missing = False
        self._reload()

    @property
    def enabled(self) -> bool:
        """False when no token is configured: every request is let through."""
        return bool(self._static or self._file)

    def check(self, authorization: str | None) -> bool:
        """True if the header value carries an accepted token (or no token is required)."""
        if not self.enabled:
            return True
        if not authorization:
            return False
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        self._reload()
        # A header that was not UTF-8 reaches us with its bytes as surrogate escapes
        # (aiohttp decodes it so): compare those bytes, which match no token, rather
        # than fail to encode them (a 500 where a 401 is due).
        candidate = token.strip().encode("utf-8", "surrogateescape")
        # Compare against every token without short-circuit so timing does not
        # tell which (or whether any) token matched a prefix.
        ok = False
        for accepted in self._static + self._from_file:
            ok |= hmac.compare_digest(candidate, accepted)
        return ok

    def _reload(self) -> None:
        if not self._file:
            return
        try:
            st = os.stat(self._file)
        except OSError:
            # Keep the last good tokens: a Secret volume swap briefly removes the file.
            # Said once per disappearance, so that one removed for good is not silent.
            if not self._missing:
                self._missing = True
                log.warning("token file missing, keeping previous tokens", extra={"file": self._file})
            return
        self._missing = False
        # Not the mtime alone: a copy that keeps it (cp -p, rsync -t, tar) is a change too.
        seen = (st.st_mtime_ns, st.st_size, st.st_ino)
        if seen == self._file_seen:
            return
        self._file_seen = seen  # read once per change, and warned about once if unreadable
        try:
            tokens = read_token_file(self._file)
        except ConfigError as e:
            log.warning("token file unreadable, keeping previous tokens", extra={"reason": str(e)})
            return
        if not tokens:
            log.warning("token file holds no token: every request will be refused", extra={"file": self._file})
        self._from_file = tuple(t.encode() for t in tokens)
