"""Standby coordinators on etcd: leader election, a fencing epoch, and the state store's backend.

Every coordinator of a run points at the same etcd (`coordinator.etcd = "HOST:PORT"`) and the same
shared `state_dir`. Keys live under `coordinator.etcd_prefix`:

    leader        {"address", "epoch", "pid", "host"}, attached to the leader's lease
    leader_epoch  the fencing token: incremented by every election win, never attached to a lease
    state/...     the `StateStore` keys (coordinator/store.py)

Election: a candidate takes a lease (TTL `etcd_lease_ttl_s`) and runs one transaction:
"if no `leader` key exists and `leader_epoch` is still the value I read, put `leader` (on my
lease) and `leader_epoch` + 1". A candidate that led before first revokes its old lease, so its
own stale `leader` key never holds the seat. The winner renews its lease every TTL/3; a standby
tries again every TTL/8.

The lease deadline (docs/design.md, "Standby coordinators and etcd"). The leader keeps, by its own
monotonic clock, the time until which the lease is surely its own: the moment it sent the last
renewal etcd answered, plus the TTL etcd granted. etcd counts the TTL from when it received that
renewal, so no standby can win before this deadline. Every renewal and every store call is bounded
by it; once it passes, the lease counts as lost whatever etcd answers later (`lost` is set), and
serve.py stops accepting pushes and commits. A store call that fails or times out is
`EtcdUnreachable`: the leader cannot know what it wrote, so it steps down too and a new term
reloads the state.

Fencing: every state write is a transaction conditioned on `leader_epoch` still equal to the
writer's epoch. A leader that was paused (or partitioned) past its lease and then resumes cannot
write anything once a standby has won: its transaction fails and `Fenced` is raised.

The client's gRPC channel reconnects with a short, bounded backoff (`channel_options`): gRPC's
default backoff grows to two minutes while etcd is down, so a standby would find etcd back only
long after it is.

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
# etcd refuses client pings more often than its --grpc-keepalive-min-time (5 s by default) and
# closes such a connection, so keep-alive pings go no faster than that.
KEEPALIVE_MS = 5000
FAILURE_LOG_EVERY_S = 10.0  # a standby that cannot reach etcd says so this often, not every attempt


class EtcdUnreachable(Fenced):
    """A store call did not complete: etcd did not answer in time, or the leader lease lapsed.
    The leader cannot tell what the call did, so it stops leading (a new term reloads the state)."""


def _import_aetcd():
    try:
        import aetcd
    except ImportError as exc:  # pragma: no cover - aetcd is a dependency
        raise RuntimeError("coordinator.etcd needs the aetcd package (pip install aetcd==1.0.0)") from exc
    return aetcd


def channel_options(ttl_s: float) -> dict[str, int]:
    """gRPC options of the etcd channel: a bounded reconnect backoff (at most TTL/4, so a channel
    finds etcd back within a fraction of the lease) and keep-alive pings while calls are open."""
    max_backoff_ms = int(min(1000, max(100, ttl_s * 1000 / 4)))
    return {"grpc.initial_reconnect_backoff_ms": 100, "grpc.min_reconnect_backoff_ms": 100,
            "grpc.max_reconnect_backoff_ms": max_backoff_ms,
            # a channel of its own, not a subchannel shared with another client whose backoff grew
            "grpc.use_local_subchannel_pool": 1,
            "grpc.keepalive_time_ms": KEEPALIVE_MS, "grpc.keepalive_timeout_ms": max(1000, int(ttl_s * 500)),
            "grpc.keepalive_permit_without_calls": 0, "grpc.http2.max_pings_without_data": 0}


class EtcdSession:
    """One etcd client on its own loop thread; `run` executes a coroutine there and waits."""

    def __init__(self, endpoint: str, prefix: str, ttl_s: float = 5.0) -> None:
        aetcd = _import_aetcd()
        host, port = endpoint.rsplit(":", 1)
        self.endpoint = endpoint
        self.prefix = prefix.rstrip("/") + "/"
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="etcd", daemon=True)
        self._thread.start()
        self.client = aetcd.Client(host=host, port=int(port), timeout=CALL_TIMEOUT_S,
                                   options=channel_options(ttl_s))
        self.run(self.client.connect())

    def key(self, name: str) -> bytes:
        return (self.prefix + name).encode()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = CALL_TIMEOUT_S + 5) -> Any:
        """Run `coro` on the session's loop; TimeoutError (the call cancelled) after `timeout`."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(max(0.0, timeout))
        except TimeoutError:
            future.cancel()
            raise

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
    """Campaign for leadership, keep the lease alive, and know by the local clock when it is lost."""

    def __init__(self, session: EtcdSession, ttl_s: int, address: str) -> None:
        self.session = session
        self.ttl_s = ttl_s
        self.address = address
        self.epoch = 0
        self.lease: Any = None
        self.lost = threading.Event()
        self.lost_reason = ""
        self.deadline = 0.0  # monotonic: until then the lease is surely this process's
        self.renewed_at = 0.0  # wall time the last answered renewal (or the grant) was sent
        self.etcd_error = ""  # the last failed renewal's error; "" once one succeeds
        self._keepalive: asyncio.Future | None = None
        self._term = 0  # counts wins: a keep-alive of an earlier term never touches this one

    # ---- standing --------------------------------------------------------------------------------

    def campaign(self, stop: threading.Event | None = None, poll_s: float | None = None) -> int:
        """Block until this process is the leader; its epoch (the fencing token). A process that
        led before (and lost the lease) stands again the same way."""
        poll_s = poll_s if poll_s is not None else max(0.1, self.ttl_s / 8)
        self.lost.clear()
        self.lost_reason = ""
        failures, failing_since, last_said = 0, 0.0, 0.0
        while stop is None or not stop.is_set():
            try:
                epoch = self.session.run(self._try_once(), timeout=max(1.0, float(self.ttl_s)))
            except Exception as exc:  # etcd unreachable for a moment: keep campaigning
                now = time.monotonic()
                if not failures:
                    failing_since = last_said = now
                    log.warning("election attempt failed (etcd %s): %s", self.session.endpoint, _say(exc))
                elif now - last_said >= FAILURE_LOG_EVERY_S:
                    last_said = now
                    log.warning("still cannot reach etcd %s: %d election attempts failed in %.0fs (last: %s)",
                                self.session.endpoint, failures + 1, now - failing_since, _say(exc))
                failures += 1
                epoch = 0
            else:
                if failures:
                    log.info("etcd %s answers again after %d failed election attempts in %.1fs",
                             self.session.endpoint, failures, time.monotonic() - failing_since)
                    failures = 0
            if epoch:
                self.epoch = epoch
                self._term += 1
                self._keepalive = asyncio.run_coroutine_threadsafe(self._keep_alive(self._term), self.session.loop)
                log.info("elected leader with epoch %d (lease TTL %ds)", epoch, self.ttl_s)
                return epoch
            if stop is not None:
                stop.wait(poll_s)
            else:
                time.sleep(poll_s)
        raise InterruptedError("campaign stopped")

    async def _try_once(self) -> int:
        """One election transaction with a fresh lease (a standby's lease is not kept alive)."""
        s, tx = self.session, self.session.client.transactions
        if self.lease is not None:  # this process led before: its old lease must not hold the seat
            try:
                await self.lease.revoke()
            except Exception as exc:
                if "lease not found" not in str(exc):  # etcd unreachable: try again next attempt
                    raise
            self.lease = None  # revoked now, or it had expired already
        sent = time.monotonic()
        sent_wall = time.time()
        lease = await s.client.lease(self.ttl_s)
        current = await s.get_int("leader_epoch")
        epoch_key = s.key("leader_epoch")
        record = json.dumps({"address": self.address, "epoch": current + 1, "pid": os.getpid(),
                             "host": socket.gethostname()})
        won, _ = await s.client.transaction(
            compare=[tx.version(s.key("leader")) == 0,
                     (tx.value(epoch_key) == str(current)) if current else (tx.version(epoch_key) == 0)],
            success=[tx.put(s.key("leader"), record.encode(), lease=lease),
                     tx.put(epoch_key, str(current + 1).encode())], failure=[])
        if not won:
            await lease.revoke()
            return 0
        self.lease = lease
        self.deadline = sent + lease.ttl
        self.renewed_at = sent_wall
        self.etcd_error = ""
        return current + 1

    # ---- leading ---------------------------------------------------------------------------------

    def remaining(self) -> float:
        """Seconds until the lease deadline (≤ 0: lapsed, or lost)."""
        return -1.0 if self.lost.is_set() else self.deadline - time.monotonic()

    def leading(self) -> bool:
        return self.remaining() > 0

    def check(self) -> None:
        """Set `lost` if the deadline has passed (the watcher calls this on its own clock)."""
        if not self.lost.is_set() and time.monotonic() >= self.deadline:
            self._lose(self._lapsed())

    def problem(self) -> str:
        """Why the store may not answer now ("" while renewals succeed)."""
        if self.lost.is_set():
            return f"not the leader: {self.lost_reason}"
        if self.etcd_error:
            return (f"etcd {self.session.endpoint} unreachable (last renewal {time.time() - self.renewed_at:.1f}s "
                    f"ago, lease deadline in {self.remaining():.1f}s): {self.etcd_error}")
        return ""

    def _lapsed(self) -> str:
        return (f"could not renew the leader lease within its TTL of {self.ttl_s}s: the last renewal etcd "
                f"answered was sent at {_clock(self.renewed_at)} (unix {self.renewed_at:.3f}, "
                f"{time.time() - self.renewed_at:.2f}s ago)"
                + (f"; etcd: {self.etcd_error}" if self.etcd_error
                   else "; no renewal was answered since (etcd unreachable, or this process was paused)"))

    async def _keep_alive(self, term: int) -> None:
        interval = self.ttl_s / 3
        next_at = time.monotonic() + interval
        while not self.lost.is_set() and term == self._term:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            sent, sent_wall = time.monotonic(), time.time()
            if sent >= self.deadline:
                self._lose(self._lapsed(), term)
                return
            try:
                reply = await asyncio.wait_for(self.lease.refresh(), timeout=self.deadline - sent)
            except asyncio.TimeoutError:
                self._lose(self._lapsed(), term)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd refused or is unreachable: try again soon, until the deadline
                if not self.etcd_error:
                    log.warning("leader lease renewal failed (%.1fs left): %s", self.deadline - time.monotonic(),
                                _say(exc))
                self.etcd_error = _say(exc)
                next_at = time.monotonic() + min(interval, 0.2)
                continue
            if reply is None or reply.TTL <= 0:
                self._lose("etcd says the leader lease expired (this process stalled or lost etcd for longer "
                           "than its TTL)", term)
                return
            if self.lost.is_set() or term != self._term:
                return
            if self.etcd_error:
                log.info("leader lease renewed again after: %s", self.etcd_error)
            self.deadline = sent + reply.TTL
            self.renewed_at = sent_wall
            self.etcd_error = ""
            next_at = sent + interval

    def _lose(self, reason: str, term: int | None = None) -> None:
        if self.lost.is_set() or (term is not None and term != self._term):
            return
        self.lost_reason = reason
        log.error("lost leadership (epoch %d): %s", self.epoch, reason)
        self.lost.set()

    def step_down(self) -> None:
        """Stop renewing (the lease stays with etcd until `campaign` revokes it or it expires)."""
        self.lost.set()
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None

    def resign(self, timeout_s: float = 5.0) -> bool:
        """Give the lease back (a clean hand-over: a standby wins at its next attempt)."""
        self.step_down()
        if self.lease is None:
            return True
        try:
            self.session.run(self.lease.revoke(), timeout=timeout_s)
        except Exception as exc:
            log.warning("could not revoke the leader lease: %s", _say(exc))
            return False
        self.lease = None
        return True

    def leader(self) -> dict[str, Any] | None:
        got = self.session.run(self.session.client.get(self.session.key("leader")))
        return json.loads(got.value) if got is not None else None


class EtcdKV:
    """The `KVBackend` of `StateStore` in etcd: every write fenced by the leader epoch, every call
    bounded by the leader lease's deadline when `election` is given."""

    def __init__(self, session: EtcdSession, epoch: int, on_fenced: Any = None,
                 election: LeaderElection | None = None) -> None:
        self.session = session
        self.epoch = epoch
        self.on_fenced = on_fenced
        self.election = election
        self.base = "state/"

    def _k(self, key: str) -> bytes:
        return self.session.key(self.base + key)

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        timeout = CALL_TIMEOUT_S
        if self.election is not None:
            timeout = min(timeout, self.election.remaining())
            if timeout <= 0:
                coro.close()
                raise EtcdUnreachable(f"store call not made: {self.election.lost_reason or 'the leader lease lapsed'}")
        try:
            return self.session.run(coro, timeout=timeout)
        except TimeoutError as exc:
            if self.election is not None:
                self.election.check()  # the deadline passed during the call: say so as the watcher would
            raise EtcdUnreachable(f"etcd {self.session.endpoint} did not answer within {timeout:.1f}s"
                                  + (" (the leader lease's deadline)" if timeout < CALL_TIMEOUT_S else "")) from exc
        except Fenced:
            raise
        except Exception as exc:
            raise EtcdUnreachable(f"etcd {self.session.endpoint}: {_say(exc)}") from exc

    def get(self, key: str) -> str | None:
        got = self._run(self.session.client.get(self._k(key)))
        return got.value.decode() if got is not None else None

    def scan(self, prefix: str) -> list[tuple[str, str]]:
        got = self._run(self.session.client.get_prefix(self._k(prefix)))
        skip = len(self.session.prefix + self.base)
        return sorted((kv.key.decode()[skip:], kv.value.decode()) for kv in got)

    def write(self, puts: dict[str, str], deletes: list[tuple[str, str]]) -> None:
        s, tx = self.session, self.session.client.transactions
        ops = [tx.delete(self._k(start), range_end=self._k(end)) for start, end in deletes]
        ops += [tx.put(self._k(k), v.encode()) for k, v in puts.items()]
        ok, _ = self._run(s.client.transaction(compare=[tx.value(s.key("leader_epoch")) == str(self.epoch)],
                                               success=ops, failure=[]))
        if not ok:
            now = self._run(s.get_int("leader_epoch"))
            if self.on_fenced is not None:
                self.on_fenced()
            raise Fenced(f"write refused: this coordinator's leader epoch {self.epoch} is fenced "
                         f"(the current epoch is {now}); another coordinator took over")

    def close(self) -> None:
        pass


def etcd_store(session: EtcdSession, epoch: int, on_fenced: Any = None,
               election: LeaderElection | None = None) -> StateStore:
    return StateStore(EtcdKV(session, epoch, on_fenced, election))


def _say(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _clock(wall: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(wall)) + f".{int(wall % 1 * 1000):03d}"


__all__ = ["EtcdSession", "LeaderElection", "EtcdKV", "EtcdUnreachable", "etcd_store", "channel_options",
           "Fenced", "prefix_end"]
