"""Stores behind one interface: memory and sqlite (redis:// is accepted by the config syntax, not built yet)."""

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
    raise ConfigError(
        f"store (SIDECAR_STORE): {scheme}:// is not built in this version; use sqlite:///path or memory://"
    )
