"""`archipelago coordinator serve|status`: run the coordinator service, or ask it how it is doing."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
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
    status = sub.add_parser("status", help="print the coordinator's status")
    status.add_argument("--address", required=True, help="HOST:PORT")
    status.add_argument("--credential", default=os.environ.get("ARCHIPELAGO_ADMIN_CREDENTIAL", ""),
                        help="admin credential (default: $ARCHIPELAGO_ADMIN_CREDENTIAL)")
    status.add_argument("--json", action="store_true", help="print the raw JSON status")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.action == "serve":
        overrides = list(args.overrides)
        for flag, key in (("host", "host"), ("port", "port"), ("state_dir", "state_dir")):
            if getattr(args, flag) is not None:
                overrides.append(f"coordinator.{key}={json.dumps(getattr(args, flag))}")
        cfg = cfglib.load(CoordinatorJob, args.preset, overrides).coordinator
        if not cfg.admin_credential and os.environ.get("ARCHIPELAGO_ADMIN_CREDENTIAL"):
            cfg.admin_credential = os.environ["ARCHIPELAGO_ADMIN_CREDENTIAL"]
        init = args.init or os.path.join(cfg.state_dir, "init")
        if not os.path.isdir(init):
            raise cfglib.ConfigError(f"--init {init} does not exist (write one with archipelago island init)")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s coordinator %(levelname)s %(message)s")
        from coordinator.server import serve

        asyncio.run(serve(cfg, init))
        return 0
    return status(args)


def status(args) -> int:
    from protos import archipelago_pb2 as pb
    from protos import archipelago_pb2_grpc as pb_grpc

    with grpc.insecure_channel(args.address) as channel:
        try:
            reply = pb_grpc.AdminStub(channel).Status(pb.AdminRequest(credential=args.credential), timeout=10)
        except grpc.RpcError as exc:
            console.print(f"[red]coordinator {args.address}: {exc.code().name}: {exc.details()}")
            return 1
    detail = json.loads(reply.json)
    if args.json:
        print(json.dumps(detail, indent=2))
        return 0
    from rich.table import Table

    console.print(f"version [bold]{reply.version}[/], rounds {detail['rounds']}, "
                  f"last checkpoint {detail['last_checkpoint']}")
    table = Table("island", "epoch", "state", "last seen (s)", "pushes", "bytes in", "bytes out")
    for i in reply.islands:
        table.add_row(i.island_id, str(i.epoch), i.state, f"{i.last_seen_s:.1f}", str(i.pushes),
                      f"{i.bytes_in:,}", f"{i.bytes_out:,}")
    console.print(table)
    return 0
