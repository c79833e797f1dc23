"""Standby coordinators on etcd: leader election, a fencing epoch, and the state store's backend.

Every coordinator of a run points at the same etcd (`coordinator.etcd = "HOST:PORT"`) and the same
shared `state_dir`. Keys live under `coordinator.etcd_prefix`:

    leader        {"address", "epoch", "pid", "host"}, attached to the leader's lease
    leader_epoch  the fencing token: incremented by every election win, never attached to a lease
    state/...     the `StateStore` keys (coordinator/store.py)

Election: a candidate takes a lease (TTL `etcd_lease_ttl_s`) and runs one transaction:
"if no `leader` key exists and `leader_epoch` is still the value I read, put `leader` (on my
lease) and `leader_epoch` + 1". The winner keeps its lease alive every TTL/3; when it dies or stalls,
its lease expires, etcd deletes `leader`, and a standby's next attempt (every TTL/8) wins.

Fencing: every state write is a transaction conditioned on `leader_epoch` still equal to the
writer's epoch. A leader that was paused (or partitioned) past its lease and then resumes cannot
write anything once a standby has won: its transaction fails, `Fenced` is raised, and the server
stops. Reads need no fence: only a leader reads, and whatever it read was committed before.

aetcd is asyncio-native; `EtcdSession` runs its client on a private event loop in a thread, so
the synchronous store calls (made from the round engine's worker threads) and the coordinator's
own loop never share a loop with it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Coroutine
from typing import Any

from coordinator.store import Fenced, StateStore, prefix_end

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 10.0


def _import_aetcd():
    try:
        import aetcd
    except ImportError as exc:  # pragma: no cover - aetcd is a dependency
        raise RuntimeError("coordinator.etcd needs the aetcd package (pip install aetcd==1.0.0)") from exc
    return aetcd


class EtcdSession:
    """One etcd client on its own loop thread; `run` executes a coroutine there and waits."""

    def __init__(self, endpoint: str, prefix: str) -> None:
        aetcd = _import_aetcd()
        host, port = endpoint.rsplit(":", 1)
        self.prefix = prefix.rstrip("/") + "/"
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="etcd", daemon=True)
        self._thread.start()
        self.client = aetcd.Client(host=host, port=int(port), timeout=CALL_TIMEOUT_S)
        self.run(self.client.connect())

    def key(self, name: str) -> bytes:
        return (self.prefix + name).encode()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = CALL_TIMEOUT_S + 5) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def get_int(self, name: str) -> int:
        got = await self.client.get(self.key(name))
        return int(got.value) if got is not None else 0

    def close(self) -> None:
        try:
            self.run(self.client.close(), timeout=5)
        except Exception:  # closing a client whose server is gone
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


class LeaderElection:
    """Campaign for leadership, keep the lease alive, notice when it is lost."""

    def __init__(self, session: EtcdSession, ttl_s: int, address: str) -> None:
        self.session = session
        self.ttl_s = ttl_s
        self.address = address
        self.epoch = 0
        self.lease: Any = None
        self.lost = threading.Event()
        self.lost_reason = ""
        self._keepalive: asyncio.Future | None = None

    def campaign(self, stop: threading.Event | None = None, poll_s: float | None = None) -> int:
        """Block until this process is the leader; its epoch (the fencing token)."""
        poll_s = poll_s if poll_s is not None else max(0.1, self.ttl_s / 8)
        while stop is None or not stop.is_set():
            try:
                epoch = self.session.run(self._try_once())
            except Exception as exc:  # etcd unreachable for a moment: keep campaigning
                log.warning("election attempt failed: %s", exc)
                epoch = 0
            if epoch:
                self.epoch = epoch
                self._keepalive = asyncio.run_coroutine_threadsafe(self._keep_alive(), self.session.loop)
                log.info("elected leader with epoch %d (lease TTL %ds)", epoch, self.ttl_s)
                return epoch
            time.sleep(poll_s)
        raise InterruptedError("campaign stopped")

    async def _try_once(self) -> int:
        """One election transaction with a fresh lease (a standby's lease is not kept alive)."""
        s, tx = self.session, self.session.client.transactions
        self.lease = await s.client.lease(self.ttl_s)
        current = await s.get_int("leader_epoch")
        epoch_key = s.key("leader_epoch")
        record = json.dumps({"address": self.address, "epoch": current + 1, "pid": os.getpid(),
                             "host": socket.gethostname()})
        won, _ = await s.client.transaction(
            compare=[tx.version(s.key("leader")) == 0,
                     (tx.value(epoch_key) == str(current)) if current else (tx.version(epoch_key) == 0)],
            success=[tx.put(s.key("leader"), record.encode(), lease=self.lease),
                     tx.put(epoch_key, str(current + 1).encode())], failure=[])
        if not won:
            await self.lease.revoke()
            self.lease = None
        return current + 1 if won else 0

    async def _keep_alive(self) -> None:
        interval = self.ttl_s / 3
        last_ok = time.monotonic()
        while not self.lost.is_set():
            await asyncio.sleep(interval)
            try:
                reply = await self.lease.refresh()
                if reply is None or reply.TTL <= 0:
                    self._lose("the leader lease expired (this process stalled or lost etcd for longer "
                               "than its TTL)")
                    return
                last_ok = time.monotonic()
            except Exception as exc:
                if time.monotonic() - last_ok > self.ttl_s:
                    self._lose(f"could not keep the leader lease alive for {self.ttl_s}s: {exc}")
                    return

    def _lose(self, reason: str) -> None:
        self.lost_reason = reason
        log.error("lost leadership (epoch %d): %s", self.epoch, reason)
        self.lost.set()

    def resign(self) -> None:
        """Give the lease back (a clean shutdown: a standby takes over at once)."""
        self.lost.set()
        if self._keepalive is not None:
            self._keepalive.cancel()
        if self.lease is not None:
            try:
                self.session.run(self.lease.revoke(), timeout=5)
            except Exception as exc:
                log.warning("could not revoke the leader lease: %s", exc)

    def leader(self) -> dict[str, Any] | None:
        got = self.session.run(self.session.client.get(self.session.key("leader")))
        return json.loads(got.value) if got is not None else None


class EtcdKV:
    """The `KVBackend` of `StateStore` in etcd: every write fenced by the leader epoch."""

    def __init__(self, session: EtcdSession, epoch: int, on_fenced: Any = None) -> None:
        self.session = session
        self.epoch = epoch
        self.on_fenced = on_fenced
        self.base = "state/"

    def _k(self, key: str) -> bytes:
        return self.session.key(self.base + key)

    def get(self, key: str) -> str | None:
        got = self.session.run(self.session.client.get(self._k(key)))
        return got.value.decode() if got is not None else None

    def scan(self, prefix: str) -> list[tuple[str, str]]:
        got = self.session.run(self.session.client.get_prefix(self._k(prefix)))
        skip = len(self.session.prefix + self.base)
        return sorted((kv.key.decode()[skip:], kv.value.decode()) for kv in got)

    def write(self, puts: dict[str, str], deletes: list[tuple[str, str]]) -> None:
        s, tx = self.session, self.session.client.transactions
        ops = [tx.delete(self._k(start), range_end=self._k(end)) for start, end in deletes]
        ops += [tx.put(self._k(k), v.encode()) for k, v in puts.items()]
        ok, _ = s.run(s.client.transaction(compare=[tx.value(s.key("leader_epoch")) == str(self.epoch)],
                                           success=ops, failure=[]))
        if not ok:
            now = s.run(s.get_int("leader_epoch"))
            if self.on_fenced is not None:
                self.on_fenced()
            raise Fenced(f"write refused: this coordinator's leader epoch {self.epoch} is fenced "
                         f"(the current epoch is {now}); another coordinator took over")

    def close(self) -> None:
        pass


def etcd_store(session: EtcdSession, epoch: int, on_fenced: Any = None) -> StateStore:
    return StateStore(EtcdKV(session, epoch, on_fenced))


__all__ = ["EtcdSession", "LeaderElection", "EtcdKV", "etcd_store", "Fenced", "prefix_end"]
