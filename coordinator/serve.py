"""Running the coordinator: the leader election (with etcd), the state, the gRPC server, and a clean
stop on SIGTERM or SIGINT.

With `coordinator.etcd` set, `serve` first wins the leader election (coordinator/etcd.py) and only
then loads the state and opens its port; a standby waits in the election. A term as leader ends when
the lease's local deadline passes without a renewal etcd answered, when a store write is fenced, or
when etcd does not answer a store call: the coordinator stops accepting pushes and commits at once,
closes its port, and stands for election again, as a standby (docs/design.md, "Standby coordinators
and etcd"). Without etcd the state store is the embedded sqlite one in the state directory.

SIGTERM and SIGINT (how systemd and Kubernetes stop a service) hand over cleanly: island calls are
refused with UNAVAILABLE (islands retry at their next address; a push already being recorded
finishes first), the rounds already closing finish their commits (for at most one lease TTL with
etcd), the lease is revoked so a standby wins at its next attempt, and `serve` returns (the CLI
exits 0). A standby that gets the signal just leaves the election.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc

from archipelago.procs import free_port
from coordinator.config import CoordinatorConfig
from coordinator.metrics import Metrics
from coordinator.security import server_credentials
from coordinator.server import AdminService, Coordinator, CoordinatorService
from coordinator.store import Fenced
from coordinator.wire import ParseErrors
from protos import archipelago_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 60.0
WATCH_S = 0.05  # how often a leader compares its lease deadline with its own clock
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def grpc_options(cfg: CoordinatorConfig) -> list[tuple[str, int]]:
    """Message limits for both ends; without them an oversized message surfaces as INTERNAL."""
    return [("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.max_receive_message_length", cfg.max_message_bytes)]


class LostLeadership(Exception):
    """This coordinator is no longer the leader of its run (fenced write or lost etcd lease)."""


class StopRequest:
    """A signal's (or the caller's) request to stop: seen by the loop and by the campaign thread."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.thread_event = threading.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        if not self.event.is_set():
            self.reason = reason
            log.info("%s: handing over and stopping", reason)
        self.event.set()
        self.thread_event.set()

    def is_set(self) -> bool:
        return self.event.is_set()


def _install_signals(stop: StopRequest) -> list[int]:
    """SIGTERM and SIGINT request a clean stop (only the main thread's loop can take signals)."""
    if threading.current_thread() is not threading.main_thread():
        return []
    loop = asyncio.get_running_loop()
    installed = []
    for sig in STOP_SIGNALS:
        try:
            loop.add_signal_handler(sig, stop.set, signal.Signals(sig).name)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # not on this platform or loop
            pass
    return installed


async def serve(cfg: CoordinatorConfig, init: str | Path, ready: asyncio.Event | None = None) -> None:
    """Run the coordinator until an admin Shutdown, SIGTERM or SIGINT (or cancellation).

    With `cfg.etcd`, stand for election, lead while the lease holds, and stand again after losing it;
    without, serve on the sqlite state until stopped.
    """
    credentials = server_credentials(cfg)  # before anything is loaded: a refused config fails fast
    stop = StopRequest()
    signals = _install_signals(stop)
    metrics = Metrics(cfg.metrics_port, cfg.host)  # one endpoint for the process, across terms
    try:
        if not cfg.etcd:
            await _term(cfg, init, None, None, credentials, metrics, stop, ready)
            return
        await _stand(cfg, init, credentials, metrics, stop, ready)
    finally:
        loop = asyncio.get_running_loop()
        for sig in signals:
            loop.remove_signal_handler(sig)


async def _stand(cfg: CoordinatorConfig, init: str | Path, credentials: Any, metrics: Metrics,
                 stop: StopRequest, ready: asyncio.Event | None) -> None:
    """Campaign, lead, and campaign again after a lost term, until asked to stop."""
    from coordinator.etcd import EtcdSession, LeaderElection, etcd_store

    if not cfg.port:
        cfg = replace(cfg, port=free_port(cfg.host))
    # Each shard elects its own leader in its own key space (docs/design.md, "Sharded coordinator").
    prefix = cfg.shard_etcd_prefix
    session = await asyncio.to_thread(EtcdSession, cfg.etcd, prefix, cfg.etcd_lease_ttl_s)
    election = LeaderElection(session, cfg.etcd_lease_ttl_s, f"{cfg.host}:{cfg.port}")
    try:
        while not stop.is_set():
            log.info("standing for election in etcd %s (%s) as %s:%d", cfg.etcd, prefix, cfg.host, cfg.port)
            try:
                await asyncio.to_thread(election.campaign, stop.thread_event)
            except InterruptedError:
                return
            if stop.is_set():  # won just as the signal came
                election.resign()
                return
            store = etcd_store(session, election.epoch, election=election)
            try:
                done = await _term(cfg, init, store, election, credentials, metrics, stop, ready)
            except Fenced as exc:  # the store stopped answering while the state was loaded
                log.error("lost leadership while loading the state: %s", exc)
                done = False
            except BaseException:
                election.resign()  # a coordinator that cannot serve must not hold the seat
                raise
            if done:
                return
            election.step_down()
            log.warning("no longer the leader (epoch %d); standing for election again", election.epoch)
    finally:
        election.step_down()
        await asyncio.to_thread(session.close)


async def _watch(coord: Coordinator, election: Any, stop: StopRequest) -> None:
    """Stop the term when a signal asks for it, or when the lease is lost, by this process's clock."""
    while not coord.stopping.is_set():
        if stop.is_set():
            coord.stop(f"{stop.reason}: handing over")
            return
        if election is not None:
            election.check()
            if election.lost.is_set():
                coord.lost_leadership = True
                coord.stop(f"lost leadership: {election.lost_reason}")
                return
        try:
            await asyncio.wait_for(stop.event.wait(), timeout=WATCH_S)
        except asyncio.TimeoutError:
            pass


async def _term(cfg: CoordinatorConfig, init: str | Path, store: Any, election: Any, credentials: Any,
                metrics: Metrics, stop: StopRequest, ready: asyncio.Event | None) -> bool:
    """Serve as the run's coordinator until stopped. True: the process should end (admin Shutdown, a
    signal); False: the term ended because leadership was lost (stand again)."""
    coord = Coordinator(cfg, init, store, metrics=metrics, leadership=election)
    server = grpc.aio.server(options=grpc_options(cfg), interceptors=[ParseErrors()])
    pb_grpc.add_CoordinatorServicer_to_server(CoordinatorService(coord), server)
    pb_grpc.add_AdminServicer_to_server(AdminService(coord), server)
    if credentials is None:
        port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
    else:
        port = server.add_secure_port(f"{cfg.host}:{cfg.port}", credentials)
    await server.start()
    address = f"{cfg.host}:{port}"
    address_file = Path(cfg.state_dir) / "address"
    tmp = address_file.with_name(f".address.tmp-{os.getpid()}")
    tmp.write_text(address)
    os.replace(tmp, address_file)
    log.info("coordinator%s listening on %s (%s, version %d, timeline %d, %s%s)",
             f" shard {cfg.shard_index} of {cfg.num_shards}" if cfg.num_shards > 1 else "", address,
             "plaintext" if credentials is None else "mutual TLS" if cfg.tls_ca else "TLS",
             coord.engine.version, coord.engine.timeline, "resumed" if coord.resumed else "fresh",
             f", leader epoch {election.epoch}" if election else "")
    if ready is not None:
        ready.set()
    ticker = asyncio.create_task(coord.run_ticker())
    watcher = asyncio.create_task(_watch(coord, election, stop))
    try:
        await coord.stopping.wait()
    finally:
        coord.stopping.set()
        ticker.cancel()
        watcher.cancel()
        await _end_term(coord, server, election)
    if coord.lost_leadership and election is None:
        raise LostLeadership(coord.stop_reason)
    return not coord.lost_leadership


async def _end_term(coord: Coordinator, server: Any, election: Any) -> None:
    """Finish a term: with the lease still held, let the rounds already closing commit (bounded),
    then give the lease back; a term that lost leadership only waits for its own work to end."""
    if election is not None and coord.lost_leadership:
        election.step_down()  # nothing of this term can be written any more
    drain_s = DRAIN_TIMEOUT_S if election is None or coord.lost_leadership else float(election.ttl_s)
    try:  # a round closing in the background finishes its commit before the store closes
        await asyncio.wait_for(coord.engine.drain(), timeout=drain_s)
    except asyncio.TimeoutError:
        log.warning("rounds still closing after %.0fs; stopping without them (their pushes stay pending "
                    "in the store)", drain_s)
    if election is not None and not coord.lost_leadership:
        if await asyncio.to_thread(election.resign):
            log.info("leader lease revoked (epoch %d): a standby can take over now", election.epoch)
    await asyncio.sleep(0.2)  # let refusals and SHUTDOWN events reach islands
    await server.stop(grace=0.0 if coord.lost_leadership else 1.0)
    coord.store.close()
