"""The emulated WAN link: real TCP bytes through the proxy, counted, rate-limited and delayed."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from archipelago.config import ConfigError
from sim.wan import LinkProxy, WanSpec


def echo_server() -> tuple[socket.socket, int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def round_trip(proxy: LinkProxy, payload: bytes) -> float:
    host, port = proxy.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        start = time.monotonic()
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            got += sock.recv(1 << 16)
        elapsed = time.monotonic() - start
    assert got == payload
    return elapsed


def test_plain_link_counts_bytes_both_ways():
    srv, port = echo_server()
    proxy = LinkProxy(f"127.0.0.1:{port}").start()
    try:
        round_trip(proxy, b"x" * 100_000)
    finally:
        proxy.stop()
        srv.close()
    assert proxy.stats.bytes_up == 100_000 and proxy.stats.bytes_down == 100_000
    assert proxy.stats.peak_bits_per_s() >= 100_000 * 8


def test_shaped_link_enforces_rate_and_latency():
    srv, port = echo_server()
    spec = WanSpec.parse("8mbit,50ms")
    proxy = LinkProxy(f"127.0.0.1:{port}", wan=spec).start()
    try:
        small = round_trip(proxy, b"p")
        big = round_trip(proxy, b"y" * 500_000)  # 4 Mbit each way at 8 Mbit/s: ≥ 0.5 s
    finally:
        proxy.stop()
        srv.close()
    assert small >= 2 * 0.05, "a round trip crosses the one-way latency twice"
    assert big >= 0.5 + 0.1
    assert proxy.stats.peak_bits_per_s() <= 2 * 8e6 * 1.2, "both directions together stay near 2× the rate"


@pytest.mark.parametrize("text,rate,latency", [("100mbit,50ms", 100e6, 0.05), ("1gbit", 1e9, 0.0),
                                               ("20mbit,80ms,5ms,0.1%", 20e6, 0.08)])
def test_wan_spec_parses(text, rate, latency):
    spec = WanSpec.parse(text)
    assert spec.rate_bps == rate and spec.latency_s == pytest.approx(latency)


@pytest.mark.parametrize("text", ["fast", "100mbit,50", "100mbit,50ms,1ms,5", "0mbit"])
def test_bad_wan_spec_is_a_clear_error(text):
    with pytest.raises(ConfigError, match="--wan"):
        WanSpec.parse(text)


def test_the_link_flips_a_byte_going_up_and_a_partition_cuts_it():
    """The two faults the chaos run puts on a link (sim/run_faults.py)."""
    srv, port = echo_server()
    proxy = LinkProxy(f"127.0.0.1:{port}").start()
    try:
        host, port = proxy.address.rsplit(":", 1)
        data = bytes(range(256)) * 32  # 8 KiB
        proxy.corrupt_next(min_bytes=4096)
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(data)
            got = b""
            while len(got) < len(data):
                got += sock.recv(1 << 16)
        assert proxy.stats.corrupted == 1
        assert sum(a != b for a, b in zip(got, data, strict=True)) == 1
        proxy.partition(True)
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            try:
                sock.sendall(b"x")
                assert sock.recv(10) == b""  # closed: nothing gets through
            except ConnectionResetError:
                pass  # reset: nothing gets through either
        proxy.partition(False)
        round_trip(proxy, b"back")
        assert proxy.stats.cut_connections >= 1
    finally:
        proxy.stop()
        srv.close()


def test_a_dropping_partition_goes_silent_without_closing_anything():
    """The cut of the leader's link to etcd (`cut_leader_etcd`): bytes vanish both ways, connections
    stay open (a peer notices only by its own timeout); restored, the held connections are reset."""
    srv, port = echo_server()
    proxy = LinkProxy(f"127.0.0.1:{port}").start()
    try:
        host, port = proxy.address.rsplit(":", 1)
        held = socket.create_connection((host, int(port)), timeout=5)
        held.sendall(b"before")
        assert held.recv(16) == b"before"
        proxy.partition(True, drop=True)
        time.sleep(0.1)
        fresh = socket.create_connection((host, int(port)), timeout=5)  # accepted, leads nowhere
        for sock in (held, fresh):
            sock.settimeout(0.5)
            sock.sendall(b"lost")
            with pytest.raises(TimeoutError):  # silence, neither an answer nor a close
                sock.recv(16)
        proxy.partition(False)
        for sock in (held, fresh):
            sock.settimeout(5)
            try:
                assert sock.recv(16) == b""  # closed by the restore: the peer reconnects
            except ConnectionResetError:
                pass
            sock.close()
        round_trip(proxy, b"back")
    finally:
        proxy.stop()
        srv.close()
