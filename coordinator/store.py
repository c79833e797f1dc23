"""The coordinator's durable state, on one ordered key space with atomic multi-key writes.

`StateStore` holds every fact a restarted (or standby) coordinator needs, and nothing heavy: the
tensors live in files of the state directory (checkpoints, spilled pushes, broadcast deltas) and
the store holds their paths. It runs on a `KVBackend`: `SqliteKV` (one file in the state
directory, WAL, fsync on commit) for a single coordinator, or `coordinator.etcd.EtcdKV`, where
every write is a transaction conditioned on the writer's leader epoch (a deposed leader's writes
fail with `Fenced`).

Keys (numbers zero-padded so that key order is numeric order; island ids %-quoted):

    island/ID                      fencing epoch of the island's lease
    spill/ID/ROUND/FRAG            an accepted push: its payload file, weight, status
                                   (pending | applied | refused | discarded), the version applying it
    applied/ID/ROUND/FRAG          the version (and timeline) that applied the push: at most once
    version/V                      fragment, round, the ordered push keys and facts of version V
    delta/V                        the broadcast delta file producing version V
    checkpoint/V                   a checkpoint folder holding version V
    event/SEQ                      guard decisions and rollbacks, in order
    meta/NAME                      rounds, fragment versions, timeline, guard counters

A commit writes the version row, its applied keys, the spill statuses, the delta row, the
checkpoint pointer and the engine's counters in ONE transaction, so a push is applied at most
once whatever crash, retry or failover happens around it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, unquote

Key = tuple[str, int, int]  # (island_id, round, fragment): a push's idempotency key


class Fenced(Exception):
    """A write by a coordinator whose leader epoch is no longer current."""


class KVBackend(Protocol):
    def get(self, key: str) -> str | None: ...
    def scan(self, prefix: str) -> list[tuple[str, str]]: ...  # sorted by key
    def write(self, puts: dict[str, str], deletes: list[tuple[str, str]]) -> None: ...  # atomic
    def close(self) -> None: ...


def prefix_end(prefix: str) -> str:
    """The smallest string greater than every string starting with `prefix` (ASCII keys)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def one_key(key: str) -> tuple[str, str]:
    return key, key + "\0"


class SqliteKV:
    """The embedded backend: a key/value table in one sqlite file, each write one transaction."""

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def scan(self, prefix: str) -> list[tuple[str, str]]:
        with self._lock:
            return self._db.execute("SELECT key, value FROM kv WHERE key >= ? AND key < ? ORDER BY key",
                                    (prefix, prefix_end(prefix))).fetchall()

    def write(self, puts: dict[str, str], deletes: list[tuple[str, str]]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for start, end in deletes:
                    self._db.execute("DELETE FROM kv WHERE key >= ? AND key < ?", (start, end))
                self._db.executemany("INSERT OR REPLACE INTO kv(key, value) VALUES(?, ?)", list(puts.items()))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()


@dataclass
class Spill:
    """An accepted push, durable before it is acknowledged (its payload is a file)."""

    seq: int  # acceptance order
    path: str  # the encoded payload as received (codec header + body)
    base_version: int
    tokens: int
    weight: float
    loss_mean: float
    eval_loss: float
    compute_s: float
    status: str = "pending"  # pending | applied | refused | discarded
    version: int = 0  # the version that applied it
    last: bool = False  # the island's last push of its run for this fragment


def _n(value: int) -> str:
    return f"{value:012d}"


def _key_path(key: Key) -> str:
    island, round_, fragment = key
    return f"{quote(island, safe='')}/{_n(round_)}/{fragment:06d}"


def _parse_key(text: str) -> Key:
    island, round_, fragment = text.rsplit("/", 2)
    return unquote(island), int(round_), int(fragment)


def _dump(value: Any) -> str:
    # NaN/Infinity are allowed: islands report NaN for losses they did not measure.
    return json.dumps(value, default=float)


class StateStore:
    def __init__(self, kv: KVBackend) -> None:
        self.kv = kv

    # ---- membership -----------------------------------------------------------------------------

    def epoch(self, island_id: str) -> int:
        value = self.kv.get(f"island/{quote(island_id, safe='')}")
        return int(value) if value else 0

    def next_epoch(self, island_id: str) -> int:
        epoch = self.epoch(island_id) + 1
        self.kv.write({f"island/{quote(island_id, safe='')}": str(epoch)}, [])
        return epoch

    def known_islands(self) -> list[str]:
        return [unquote(k.split("/", 1)[1]) for k, _ in self.kv.scan("island/")]

    # ---- pushes ---------------------------------------------------------------------------------

    def was_applied(self, key: Key) -> bool:
        return self.kv.get(f"applied/{_key_path(key)}") is not None

    def spill(self, key: Key) -> Spill | None:
        value = self.kv.get(f"spill/{_key_path(key)}")
        return Spill(**json.loads(value)) if value else None

    def add_pending(self, key: Key, spill: Spill) -> None:
        self.kv.write({f"spill/{_key_path(key)}": _dump(asdict(spill))}, [])

    def spills(self, status: str | None = None) -> list[tuple[Key, Spill]]:
        out = [(_parse_key(k.split("/", 1)[1]), Spill(**json.loads(v))) for k, v in self.kv.scan("spill/")]
        out = [(k, s) for k, s in out if status is None or s.status == status]
        return sorted(out, key=lambda item: item[1].seq)

    def received_count(self, island_id: str) -> int:
        """Pushes of the island that are applied, pending, or were refused by the guard."""
        island = quote(island_id, safe="")
        applied = {k for k, _ in self.kv.scan(f"applied/{island}/")}
        held = {f"applied/{k.split('/', 1)[1]}" for k, v in self.kv.scan(f"spill/{island}/")
                if json.loads(v)["status"] in ("pending", "refused")}
        return len(applied | held)

    def applied_keys(self) -> list[tuple[str, int, int, int, int]]:
        """(island, round, fragment, version, timeline) of every push ever applied."""
        out = []
        for k, v in self.kv.scan("applied/"):
            record = json.loads(v)
            out.append((*_parse_key(k.split("/", 1)[1]), record["version"], record["timeline"]))
        return out

    # ---- versions -------------------------------------------------------------------------------

    def commit(self, version: int, fragment: int, round_: int, keys: list[Key], info: dict[str, Any],
               timeline: int, meta: dict[str, Any], delta: dict[str, Any] | None = None,
               checkpoint: str | None = None) -> None:
        """Record a committed version, the push keys it applied (in aggregation order), their spill
        statuses, its delta file, its checkpoint and the engine's counters: one transaction."""
        puts = {f"version/{_n(version)}": _dump({"fragment": fragment, "round": round_, "timeline": timeline,
                                                 "keys": [list(k) for k in keys], "info": info})}
        for key in keys:
            puts[f"applied/{_key_path(key)}"] = _dump({"version": version, "timeline": timeline})
            spill = self.spill(key)
            if spill is not None:
                spill.status, spill.version = "applied", version
                puts[f"spill/{_key_path(key)}"] = _dump(asdict(spill))
        if delta is not None:
            puts[f"delta/{_n(version)}"] = _dump(delta)
        if checkpoint is not None:
            puts[f"checkpoint/{_n(version)}"] = checkpoint
        puts.update({f"meta/{name}": _dump(value) for name, value in meta.items()})
        self.kv.write(puts, [])

    def refuse(self, keys: list[Key], event: dict[str, Any], meta: dict[str, Any]) -> None:
        """A round the guard refused: its pushes will never be applied; one transaction."""
        puts = {f"event/{_n(self._next_event())}": _dump(event)}
        for key in keys:
            spill = self.spill(key)
            if spill is not None:
                spill.status = "refused"
                puts[f"spill/{_key_path(key)}"] = _dump(asdict(spill))
        puts.update({f"meta/{name}": _dump(value) for name, value in meta.items()})
        self.kv.write(puts, [])

    def rollback(self, version: int, event: dict[str, Any], meta: dict[str, Any]) -> None:
        """Forget the versions, deltas and checkpoints after `version`; pending pushes are dropped.
        Applied keys stay: a push applied on the abandoned timeline is never applied again."""
        puts = {f"event/{_n(self._next_event())}": _dump(event)}
        for key, spill in self.spills("pending"):
            spill.status = "discarded"
            puts[f"spill/{_key_path(key)}"] = _dump(asdict(spill))
        puts.update({f"meta/{name}": _dump(value) for name, value in meta.items()})
        deletes = [(f"{prefix}/{_n(version + 1)}", prefix_end(f"{prefix}/"))
                   for prefix in ("version", "delta", "checkpoint")]
        self.kv.write(puts, deletes)

    def versions(self, after: int = -1) -> list[tuple[int, dict[str, Any]]]:
        rows = [(int(k.split("/")[1]), json.loads(v)) for k, v in self.kv.scan("version/")]
        return [(v, row) for v, row in rows if v > after]

    def deltas(self) -> list[tuple[int, dict[str, Any]]]:
        return [(int(k.split("/")[1]), json.loads(v)) for k, v in self.kv.scan("delta/")]

    def forget(self, spills: list[Key], deltas: list[int]) -> None:
        """Drop spill rows (their files are deleted by the caller) and delta rows."""
        deletes = [one_key(f"spill/{_key_path(k)}") for k in spills]
        deletes += [one_key(f"delta/{_n(v)}") for v in deltas]
        if deletes:
            self.kv.write({}, deletes)

    # ---- checkpoints ----------------------------------------------------------------------------

    def record_checkpoint(self, version: int, path: str) -> None:
        self.kv.write({f"checkpoint/{_n(version)}": path}, [])

    def checkpoints(self) -> dict[int, str]:
        return {int(k.split("/")[1]): v for k, v in self.kv.scan("checkpoint/")}

    def forget_checkpoints(self, versions: list[int]) -> None:
        if versions:
            self.kv.write({}, [one_key(f"checkpoint/{_n(v)}") for v in versions])

    def latest_checkpoint(self) -> tuple[int, str] | None:
        table = self.checkpoints()
        if not table:
            return None
        version = max(table)
        return version, table[version]

    # ---- events and counters --------------------------------------------------------------------

    def _next_event(self) -> int:
        rows = self.kv.scan("event/")
        return int(rows[-1][0].split("/")[1]) + 1 if rows else 0

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(v) for _, v in self.kv.scan("event/")]

    def get(self, key: str, default: Any = None) -> Any:
        value = self.kv.get(f"meta/{key}")
        return json.loads(value) if value is not None else default

    def put(self, key: str, value: Any) -> None:
        self.kv.write({f"meta/{key}": _dump(value)}, [])

    def close(self) -> None:
        self.kv.close()


# A read-only view of the applied push keys for tools that query the file with SQL; it assumes the
# key layout above (12-digit rounds, 6-digit fragments); ids are shown %-quoted.
APPLIED_VIEW = """
CREATE VIEW IF NOT EXISTS applied AS SELECT
    substr(key, 9, length(key) - 28) AS island_id,
    CAST(substr(key, length(key) - 18, 12) AS INTEGER) AS round,
    CAST(substr(key, length(key) - 5, 6) AS INTEGER) AS fragment,
    json_extract(value, '$.version') AS version
FROM kv WHERE key >= 'applied/' AND key < 'applied0'
"""


def sqlite_store(state_dir: str | Path) -> StateStore:
    kv = SqliteKV(Path(state_dir) / "state.sqlite")
    kv._db.execute(APPLIED_VIEW)
    return StateStore(kv)
