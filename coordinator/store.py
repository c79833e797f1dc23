"""The coordinator's durable state: membership epochs, applied push keys, committed versions.

`StateStore` is the interface; `SqliteStore` is the embedded default (one file in the state
directory, WAL mode, every write in a transaction). The applied-push keys are written in the same
transaction as the version they produced, so after a restart a push is never applied twice.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any, Protocol


class StateStore(Protocol):
    def next_epoch(self, island_id: str) -> int: ...
    def epoch(self, island_id: str) -> int: ...
    def commit(self, version: int, fragment: int, round_: int, keys: list[tuple[str, int, int]],
               info: dict[str, Any]) -> None: ...
    def was_applied(self, island_id: str, round_: int, fragment: int) -> bool: ...
    def applied_keys(self) -> list[tuple[str, int, int, int]]: ...
    def record_checkpoint(self, version: int, path: str) -> None: ...
    def latest_checkpoint(self) -> tuple[int, str] | None: ...
    def get(self, key: str, default: Any = None) -> Any: ...
    def put(self, key: str, value: Any) -> None: ...


SCHEMA = """
CREATE TABLE IF NOT EXISTS islands (island_id TEXT PRIMARY KEY, epoch INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS applied (
    island_id TEXT NOT NULL, round INTEGER NOT NULL, fragment INTEGER NOT NULL,
    version INTEGER NOT NULL, PRIMARY KEY (island_id, round, fragment));
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY, fragment INTEGER NOT NULL, round INTEGER NOT NULL, info TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (version INTEGER PRIMARY KEY, path TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class SqliteStore:
    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def _tx(self, statements: list[tuple[str, tuple]]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _one(self, sql: str, args: tuple = ()) -> Any:
        with self._lock:
            return self._db.execute(sql, args).fetchone()

    def next_epoch(self, island_id: str) -> int:
        epoch = self.epoch(island_id) + 1
        self._tx([("INSERT INTO islands(island_id, epoch) VALUES(?, ?) "
                   "ON CONFLICT(island_id) DO UPDATE SET epoch=excluded.epoch", (island_id, epoch))])
        return epoch

    def epoch(self, island_id: str) -> int:
        row = self._one("SELECT epoch FROM islands WHERE island_id=?", (island_id,))
        return int(row[0]) if row else 0

    def commit(self, version: int, fragment: int, round_: int, keys: list[tuple[str, int, int]],
               info: dict[str, Any]) -> None:
        """Record a committed version and the push keys it applied, atomically."""
        statements = [("INSERT INTO versions(version, fragment, round, info) VALUES(?, ?, ?, ?)",
                       (version, fragment, round_, json.dumps(info)))]
        statements += [("INSERT INTO applied(island_id, round, fragment, version) VALUES(?, ?, ?, ?)",
                        (island, r, f, version)) for island, r, f in keys]
        self._tx(statements)

    def truncate_after(self, version: int) -> None:
        """Forget versions (and their applied keys) above `version` (restart from a checkpoint)."""
        self._tx([("DELETE FROM applied WHERE version > ?", (version,)),
                  ("DELETE FROM versions WHERE version > ?", (version,)),
                  ("DELETE FROM checkpoints WHERE version > ?", (version,))])

    def was_applied(self, island_id: str, round_: int, fragment: int) -> bool:
        return self._one("SELECT 1 FROM applied WHERE island_id=? AND round=? AND fragment=?",
                         (island_id, round_, fragment)) is not None

    def applied_keys(self) -> list[tuple[str, int, int, int]]:
        with self._lock:
            rows = self._db.execute("SELECT island_id, round, fragment, version FROM applied").fetchall()
        return [tuple(r) for r in rows]

    def versions(self) -> list[tuple[int, int, int, dict[str, Any]]]:
        with self._lock:
            rows = self._db.execute("SELECT version, fragment, round, info FROM versions "
                                    "ORDER BY version").fetchall()
        return [(v, f, r, json.loads(i)) for v, f, r, i in rows]

    def record_checkpoint(self, version: int, path: str) -> None:
        self._tx([("INSERT OR REPLACE INTO checkpoints(version, path) VALUES(?, ?)", (version, path))])

    def latest_checkpoint(self) -> tuple[int, str] | None:
        row = self._one("SELECT version, path FROM checkpoints ORDER BY version DESC LIMIT 1")
        return (int(row[0]), str(row[1])) if row else None

    def get(self, key: str, default: Any = None) -> Any:
        row = self._one("SELECT value FROM meta WHERE key=?", (key,))
        return json.loads(row[0]) if row else default

    def put(self, key: str, value: Any) -> None:
        self._tx([("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", (key, json.dumps(value)))])

    def close(self) -> None:
        with self._lock:
            self._db.close()
