"""Stores for keys, users, spend and the ledger: SQLite (embedded default) or PostgreSQL."""
from __future__ import annotations

from .base import KeyRecord, Store, UserRecord


def open_store(url: str | None) -> Store:
    """A store for CBORG_DATABASE_URL: postgresql://... or sqlite:///path (the default)."""
    url = url or "sqlite:///data/cborg.db"
    if url.startswith(("postgres://", "postgresql://")):
        from .postgres import PostgresStore
        return PostgresStore(url)
    from .sqlite import SQLiteStore
    return SQLiteStore(url)


__all__ = ["KeyRecord", "Store", "UserRecord", "open_store"]
