"""`archipelago coordinator serve|status|rollback|certs`: run the coordinator service (alone, or as
one of several coordinators electing a leader through etcd), ask it how it is doing, roll the run
back to a kept checkpoint, or make a run's certificates for mutual TLS."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from dataclasses import dataclass, field

import grpc

from archipelago import config as cfglib
from archipelago.console import console
from coordinator.config import CoordinatorConfig


@dataclass
class CoordinatorJob:
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="archipelago coordinator", description=__doc__)
    sub = p.add_subparsers(dest="action", required=True)
    serve = sub.add_parser("serve", help="run the coordinator until an admin shutdown")
    serve.add_argument("--preset", default="ci")
    serve.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    serve.add_argument("--init", help="initial model (archipelago island init); not needed to resume")
    serve.add_argument("--host", help="override coordinator.host")
    serve.add_argument("--port", type=int, help="override coordinator.port")
    serve.add_argument("--state-dir", help="override coordinator.state_dir")
    for flag in ("cert", "key", "ca"):
        serve.add_argument(f"--tls-{flag}", help=f"override coordinator.tls_{flag} (PEM file)")
    serve.add_argument("--insecure", action="store_true",
                       help="serve without TLS on a non-loopback address (coordinator.insecure = true)")
    serve.add_argument("--etcd", help="HOST:PORT of etcd: elect a leader among the coordinators sharing "
                                      "--state-dir; this one serves only while it leads (coordinator.etcd)")
    serve.add_argument("--shard-index", type=int, help="serve shard I of a coordinator sharded by fragment "
                                                       "(coordinator.shard_index)")
    serve.add_argument("--num-shards", type=int, help="how many shards the coordinator has (coordinator.num_shards)")
    status = sub.add_parser("status", help="print the coordinator's status")
    rollback = sub.add_parser("rollback", help="roll the run back to a kept checkpoint; islands reload")
    rollback.add_argument("--to", dest="to_version", type=int, required=True, metavar="V",
                          help="the version to go back to (one with a kept checkpoint)")
    for p_ in (status, rollback):
        p_.add_argument("--address", required=True,
                        help="HOST:PORT; for status of a sharded coordinator every shard's, in shard order, "
                             "separated by ';' (a shard's failover addresses by ',')")
        p_.add_argument("--credential", default=os.environ.get("ARCHIPELAGO_ADMIN_CREDENTIAL", ""),
                        help="admin credential (default: $ARCHIPELAGO_ADMIN_CREDENTIAL)")
        p_.add_argument("--tls-ca", default="", help="CA certificate that signed the coordinator's (PEM)")
        p_.add_argument("--tls-cert", default="", help="client certificate, for a coordinator with mutual TLS")
        p_.add_argument("--tls-key", default="", help="the client certificate's key")
    status.add_argument("--json", action="store_true", help="print the raw JSON status")
    status.add_argument("--watch", action="store_true",
                        help="keep a live view of the run, refreshed every --interval seconds; on a pipe, one "
                             "line per committed round, refusal or rollback (until interrupted)")
    status.add_argument("--interval", type=positive_seconds, default=2.0, metavar="S",
                        help="seconds between two refreshes of --watch (default 2)")
    certs = sub.add_parser("certs", help="make a CA, a server certificate and client certificates (mTLS)")
    certs.add_argument("--out", required=True, help="folder for the PEM files (an existing CA there is reused)")
    certs.add_argument("--hosts", default="127.0.0.1,localhost",
                       help="comma-separated names and addresses islands use to reach the coordinator")
    certs.add_argument("--islands", default="3", help="a number N (island-0 ... island-N-1) or comma-separated ids")
    certs.add_argument("--days", type=int, default=365, help="validity of every certificate")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.action == "serve":
        overrides = list(args.overrides)
        for key in ("host", "port", "state_dir", "tls_cert", "tls_key", "tls_ca", "etcd", "shard_index",
                    "num_shards"):
            if getattr(args, key) is not None:
                overrides.append(f"coordinator.{key}={json.dumps(getattr(args, key))}")
        if args.insecure:
            overrides.append("coordinator.insecure=true")
        cfg = cfglib.load(CoordinatorJob, args.preset, overrides).coordinator
        if not cfg.admin_credential and os.environ.get("ARCHIPELAGO_ADMIN_CREDENTIAL"):
            cfg.admin_credential = os.environ["ARCHIPELAGO_ADMIN_CREDENTIAL"]
        init = args.init or os.path.join(cfg.state_dir, "init")
        if not os.path.isdir(init):
            raise cfglib.ConfigError(f"--init {init} does not exist (write one with archipelago island init)")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s coordinator %(levelname)s %(message)s")
        from coordinator.serve import LostLeadership, serve

        try:
            asyncio.run(serve(cfg, init))
        except LostLeadership as exc:
            console.print(f"[red]coordinator stopped: it no longer leads the run ({exc})")
            return exit_now(3)
        return exit_now(0)
    if args.action == "certs":
        return certs(args)
    if args.action == "rollback":
        return rollback(args)
    return status(args)


def exit_now(code: int) -> int:
    """Return ``code``, or, while a background kernel compile still runs (the codec's, started at the
    coordinator's start, protos/quant.py), end the process with it at once: an interpreter that
    shuts down under a thread inside the compiler aborts (SIGABRT) instead of exiting cleanly."""
    from protos.quant import wait_background

    if wait_background(timeout_s=2.0):
        return code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def rollback(args) -> int:
    from protos import archipelago_pb2 as pb
    from protos import archipelago_pb2_grpc as pb_grpc
    from protos.transport import open_channel

    if ";" in args.address:
        raise cfglib.ConfigError("coordinator rollback acts on one shard (versions are a shard's own): give "
                                 "that shard's address, not the ';' list")
    with open_channel(args.address, ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key) as channel:
        try:
            reply = pb_grpc.AdminStub(channel).Rollback(
                pb.RollbackRequest(credential=args.credential, to_version=args.to_version), timeout=60)
        except grpc.RpcError as exc:
            console.print(f"[red]coordinator {args.address}: {exc.code().name}: {exc.details()}")
            return 1
    console.print(f"version [bold]{reply.version}[/]: {reply.message}")
    return 0


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got '{text}'")
    return value


def _ask_status(args, address: str):
    """(the StatusReply, "") from the first of `address`'s comma-separated addresses that answers,
    or (None, the last error)."""
    from protos import archipelago_pb2 as pb
    from protos import archipelago_pb2_grpc as pb_grpc
    from protos.transport import open_channel

    error = ""
    for one in [a.strip() for a in address.split(",") if a.strip()]:
        with open_channel(one, ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key) as channel:
            try:
                return pb_grpc.AdminStub(channel).Status(pb.AdminRequest(credential=args.credential), timeout=10), ""
            except grpc.RpcError as exc:
                error = f"{one}: {exc.code().name}: {exc.details()}"
    return None, error


def status(args) -> int:
    from archipelago.runinfo import strict_json
    from protos import archipelago_pb2 as pb
    from protos import archipelago_pb2_grpc as pb_grpc
    from protos.transport import open_channel

    if args.watch:
        if ";" in args.address or "," in args.address:
            console.print("[red]coordinator status --watch takes one coordinator address (HOST:PORT)")
            return 2
        from coordinator.watch import watch

        with open_channel(args.address, ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key) as channel:
            stub = pb_grpc.AdminStub(channel)
            return watch(args, lambda: stub.Status(pb.AdminRequest(credential=args.credential),
                                                   timeout=max(2.0, args.interval)))
    if ";" in args.address:
        return sharded_status(args)
    reply, error = _ask_status(args, args.address)
    if reply is None:
        console.print(f"[red]coordinator {error}")
        return 1
    detail = json.loads(reply.json)
    if args.json:
        print(json.dumps(strict_json(detail), indent=2, allow_nan=False))
        return 0
    from rich.table import Table

    console.print(f"version [bold]{reply.version}[/], rounds {detail['rounds']}, "
                  f"last checkpoint {detail['last_checkpoint']}")
    if detail.get("view") == "local":  # the store (etcd) did not answer: the coordinator's own view
        age = detail.get("checkpoints_read_s_ago")
        console.print(f"[yellow]view: local (this coordinator's own state; {detail.get('view_reason', '')}); "
                      f"checkpoints as read {'never' if age is None else f'{age:.0f}s ago'}")
    table = Table("island", "epoch", "state", "last seen (s)", "pushes", "bytes in", "bytes out")
    for i in reply.islands:
        table.add_row(i.island_id, str(i.epoch), i.state, f"{i.last_seen_s:.1f}", str(i.pushes),
                      f"{i.bytes_in:,}", f"{i.bytes_out:,}")
    console.print(table)
    return 0


def sharded_status(args) -> int:
    """Every shard's status and the run's combined view (coordinator/shard_status.py)."""
    from rich.table import Table

    from archipelago.runinfo import strict_json
    from coordinator.shard_status import island_rows, merge_status

    addresses = [a.strip() for a in args.address.split(";")]
    if not all(addresses):
        raise cfglib.ConfigError(f"--address {args.address!r} has an empty shard address")
    replies: list = []
    for address in addresses:
        reply, error = _ask_status(args, address)
        replies.append(error if reply is None else {**json.loads(reply.json), "islands": island_rows(reply.islands)})
    merged = merge_status(addresses, replies)
    ok = not merged["combined"]["problems"]
    if args.json:
        print(json.dumps(strict_json(merged), indent=2, allow_nan=False))
        return 0 if ok else 1
    c = merged["combined"]
    console.print(f"{c['num_shards']} shards ({c['shards_answering']} answering): composite version "
                  f"[bold]{c['version']}[/] (shard versions {c['shard_versions']}), rounds {c['rounds']}, "
                  f"pending pushes {c['pending_pushes']}")
    shards = Table("shard", "address", "version", "timeline", "fragments", "pending", "last checkpoint")
    for s in merged["shards"]:
        if "error" in s:
            shards.add_row(str(s["shard"]), s["address"], "[red]down", "", "", "", s["error"])
        else:
            shards.add_row(str(s["shard"]), s["address"], str(s["version"]), str(s["timeline"]),
                           str(s.get("fragments_owned")), str(s["pending_pushes"]), str(s["last_checkpoint"]))
    console.print(shards)
    islands = Table("island", "state per shard", "pushes", "bytes in", "bytes out")
    for i in c["islands"]:
        islands.add_row(i["island_id"], " ".join(st or "-" for st in i["states"]), str(i["pushes"]),
                        f"{i['bytes_in']:,}", f"{i['bytes_out']:,}")
    console.print(islands)
    for problem in c["problems"]:
        console.print(f"[red]{problem}")
    return 0 if ok else 1


def certs(args) -> int:
    try:
        from coordinator.certs import island_names, make_certs
    except ImportError as exc:
        raise cfglib.ConfigError(f"archipelago coordinator certs needs the 'cryptography' package ({exc})") from exc
    from rich.table import Table

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    issued = make_certs(args.out, hosts, island_names(args.islands), args.days)
    table = Table("role", "name", "certificate", "key (0600)", title=f"certificates in {args.out}")
    for i in issued:
        table.add_row(i.role, i.name, i.cert.name, i.key.name)
    console.print(table)
    if not any(i.role == "ca" for i in issued):
        console.print(f"reused the CA in {args.out}")
    console.print("coordinator: --tls-cert server.crt --tls-key server.key --tls-ca ca.crt; island: "
                  "--set diloco.tls_ca=ca.crt --set diloco.tls_cert=ISLAND.crt --set diloco.tls_key=ISLAND.key")
    return 0
