"""Stores behind one interface: memory, sqlite and redis (``redis://host:port/db[?prefix=...]``)."""

from __future__ import annotations

from urllib.parse import urlsplit

from sidecar.config import Config, ConfigError, sqlite_path
from sidecar.store.base import Store


def create_store(config: Config) -> Store:
    """The store named by ``config.store``; constructing it does no I/O (``open`` does)."""
    scheme = urlsplit(config.store).scheme
    if scheme == "memory":
        from sidecar.store.memory import MemoryStore

        return MemoryStore(retention=config.reply_retention)
    if scheme == "sqlite":
        from sidecar.store.sqlite import SqliteStore

        return SqliteStore(sqlite_path(config.store), sync=config.store_sync, retention=config.reply_retention)
    if scheme == "redis":
        from sidecar.store.redis import RedisStore

        return RedisStore(config.store, retention=config.reply_retention)
    raise ConfigError(f"store (SIDECAR_STORE): unknown scheme {scheme}://; use sqlite:///path, memory:// or redis://")
