"""An island's patience with an absent coordinator (island/connection.py): `reconnect_timeout_s = 0`
waits without end, a positive one gives up after it, the time without a coordinator and the
reconnections are counted (a failover counts), and a loud line is logged while none answers. The
link's channel never connects; the RPC is a script raising gRPC errors. Over real processes the
patience is exercised by tests/coordinator/test_etcd_outage.py (etcd down for 90 s)."""

from __future__ import annotations

import logging
import time

import grpc
import pytest

from archipelago.config import ConfigError
from island import connection
from island.connection import CoordinatorLink, Presence
from island.diloco_config import DiLoCoConfig


class Unavailable(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "connection refused"

    def trailing_metadata(self):
        return ()


def script(failures: int):
    """An RPC that fails `failures` times with UNAVAILABLE, then answers with the attempt count."""
    calls = []

    def rpc():
        calls.append(time.monotonic())
        if len(calls) <= failures:
            raise Unavailable()
        return len(calls)

    return rpc, calls


def make_link(addresses: str = "127.0.0.1:1", **cfg) -> CoordinatorLink:
    return CoordinatorLink(DiLoCoConfig(retry_max_delay_s=0.05, **cfg), addresses, "island-0")


def test_the_default_waits_without_end_and_counts_the_absence():
    assert DiLoCoConfig().reconnect_timeout_s == 0  # forever, unless the operator says otherwise
    with pytest.raises(ConfigError, match="reconnect_timeout_s"):
        DiLoCoConfig(reconnect_timeout_s=-1)
    link = make_link()
    try:
        rpc, calls = script(failures=15)
        assert link.call(rpc) == 16
        assert link.reconnects == 1 and link.coordinator_switches == 0
        assert link.coordinator_wait_s >= calls[-1] - calls[0] - 0.05 > 0
    finally:
        link.close(1.0)


def test_a_positive_patience_gives_up():
    link = make_link(reconnect_timeout_s=0.4)
    try:
        rpc, calls = script(failures=10_000)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError):
            link.call(rpc)
        assert 0.3 <= time.monotonic() - started <= 2.0
    finally:
        link.close(1.0)


def test_a_failover_counts_as_a_reconnect_and_a_switch():
    link = make_link("127.0.0.1:1,127.0.0.1:2")
    try:
        assert link.call(lambda: "a") == "a" and link.reconnects == 0  # the first coordinator answers
        rpc, _ = script(failures=1)  # then it is gone; the standby at the next address answers
        link.call(rpc)
        assert link.address == "127.0.0.1:2"
        assert link.reconnects == 1 and link.coordinator_switches == 1
    finally:
        link.close(1.0)


def test_a_loud_line_every_minute_without_a_coordinator(monkeypatch, caplog):
    monkeypatch.setattr(connection, "LOUD_EVERY_S", 0.1)
    presence = Presence("island-0", patience_s=0.0)
    with caplog.at_level(logging.ERROR, logger="island.connection"):
        assert presence.failed("a:1", "UNAVAILABLE") is True  # starts the absence: no loud line yet
        assert not caplog.records
        time.sleep(0.15)
        assert presence.failed("a:1", "UNAVAILABLE") is False
    assert "NO COORDINATOR for" in caplog.text and "as long as it takes" in caplog.text
    presence.answered("a:1")
    assert presence.reconnects == 1 and presence.waited_s >= 0.15
