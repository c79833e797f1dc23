"""Running the coordinator: the leader election (with etcd), the state, the gRPC server.

With `coordinator.etcd` set, `serve` first wins the leader election (coordinator/etcd.py) and only
then loads the state and opens its port; a standby waits in the election. A leader whose store
write is fenced, or whose lease is lost, stops serving at once (`LostLeadership`; the CLI exits
with status 3). Without etcd the state store is the embedded sqlite one in the state directory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc

from archipelago.procs import free_port
from coordinator.config import CoordinatorConfig
from coordinator.security import server_credentials
from coordinator.server import AdminService, Coordinator, CoordinatorService
from coordinator.wire import ParseErrors
from protos import archipelago_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 60.0


def grpc_options(cfg: CoordinatorConfig) -> list[tuple[str, int]]:
    """Message limits for both ends; without them an oversized message surfaces as INTERNAL."""
    return [("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.max_receive_message_length", cfg.max_message_bytes)]


class LostLeadership(Exception):
    """This coordinator is no longer the leader of its run (fenced write or lost etcd lease)."""


async def _watch_leadership(coord: Coordinator, election: Any) -> None:
    while not coord.stopping.is_set():
        if election.lost.is_set():
            coord.lost_leadership = True
            coord.stop(f"lost leadership: {election.lost_reason}")
            return
        await asyncio.sleep(0.1)


async def serve(cfg: CoordinatorConfig, init: str | Path, ready: asyncio.Event | None = None) -> None:
    """Run the coordinator until an admin Shutdown (or cancellation).

    With `cfg.etcd`, first wait to win the leader election; raises `LostLeadership` if the run's
    leadership passes to another coordinator while this one serves.
    """
    credentials = server_credentials(cfg)  # before anything is loaded: a refused config fails fast
    election = session = store = None
    if cfg.etcd:
        from coordinator.etcd import EtcdSession, LeaderElection, etcd_store

        if not cfg.port:
            cfg = replace(cfg, port=free_port(cfg.host))
        # Each shard elects its own leader in its own key space (docs/design.md, "Sharded coordinator").
        prefix = cfg.shard_etcd_prefix
        session = await asyncio.to_thread(EtcdSession, cfg.etcd, prefix)
        election = LeaderElection(session, cfg.etcd_lease_ttl_s, f"{cfg.host}:{cfg.port}")
        log.info("standing for election in etcd %s (%s) as %s:%d", cfg.etcd, prefix, cfg.host, cfg.port)
        campaign_stop = threading.Event()
        try:
            await asyncio.to_thread(election.campaign, campaign_stop)
        except BaseException:
            campaign_stop.set()
            session.close()
            raise
        store = etcd_store(session, election.epoch)
    try:
        coord = Coordinator(cfg, init, store)
    except BaseException:
        if election is not None:
            election.resign()
            session.close()
        raise
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
    watcher = asyncio.create_task(_watch_leadership(coord, election)) if election is not None else None
    try:
        await coord.stopping.wait()
        await asyncio.sleep(0.2)  # let the SHUTDOWN events reach subscribers
    finally:
        coord.stopping.set()
        ticker.cancel()
        if watcher is not None:
            watcher.cancel()
        await server.stop(grace=0.0 if coord.lost_leadership else 1.0)
        try:  # a round closing in the background finishes its commit before the store closes
            await asyncio.wait_for(coord.engine.drain(), timeout=DRAIN_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("rounds still closing after %.0fs; stopping without them", DRAIN_TIMEOUT_S)
        coord.store.close()
        if election is not None:
            if not coord.lost_leadership:
                election.resign()
            session.close()
    if coord.lost_leadership:
        raise LostLeadership(coord.stop_reason)
