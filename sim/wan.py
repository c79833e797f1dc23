"""An island's link to the coordinator, as a TCP proxy on loopback that counts and shapes real bytes.

Every byte of the real gRPC connection (HTTP/2 framing included) passes through the proxy, so
the counts are what would cross the WAN. A timeline of bytes per 100 ms is kept for plots and
peak rates. With a `WanSpec` each direction is shaped like a WAN link: a token bucket at the link
rate, a one-way latency with jitter (delivery stays in order, as TCP's does), and loss, which a
TCP stream shows the application as a retransmission delay on the affected segment.

Two faults for the chaos runs (sim/run_faults.py): `partition(True)` cuts the link (open connections
are reset, new ones refused: the island sees UNAVAILABLE) until `partition(False)`; and
`corrupt_next()` flips one byte late in the next large segment going up (a push's chunk data, in
practice), which the coordinator must catch by checksum.
"""

from __future__ import annotations

import asyncio
import random
import re
import threading
import time
from dataclasses import dataclass, field

from archipelago.config import ConfigError

_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


@dataclass(frozen=True)
class WanSpec:
    """One link: rate in bits/s, one-way latency and jitter in seconds, segment loss probability."""

    rate_bps: float
    latency_s: float = 0.0
    jitter_s: float = 0.0
    loss: float = 0.0
    rto_s: float = 0.2  # what a lost segment costs: a retransmission timeout

    @classmethod
    def parse(cls, text: str) -> WanSpec:
        """`"100mbit,50ms"`, `"20mbit,80ms,5ms"`, `"1gbit,30ms,2ms,0.1%"`."""
        parts = [p.strip().lower() for p in text.split(",") if p.strip()]
        if not 1 <= len(parts) <= 4:
            raise ConfigError(f"--wan '{text}': expected RATE[,LATENCY[,JITTER[,LOSS%]]], e.g. 100mbit,50ms")
        m = re.fullmatch(r"([0-9.]+)\s*(bit|kbit|mbit|gbit)", parts[0])
        if not m:
            raise ConfigError(f"--wan '{text}': rate '{parts[0]}' must look like 100mbit (bit/kbit/mbit/gbit)")
        rate = float(m.group(1)) * _RATE_UNITS[m.group(2)]
        times = [_seconds(p, text) for p in parts[1:3]]
        loss = 0.0
        if len(parts) == 4:
            if not parts[3].endswith("%"):
                raise ConfigError(f"--wan '{text}': loss '{parts[3]}' must be a percentage like 0.1%")
            loss = float(parts[3][:-1]) / 100
        if rate <= 0 or not 0 <= loss < 1:
            raise ConfigError(f"--wan '{text}': rate must be positive and loss in [0, 100%)")
        return cls(rate, *(times + [0.0, 0.0])[:2], loss=loss)

    def describe(self) -> str:
        return (f"{self.rate_bps / 1e6:g}mbit, {self.latency_s * 1e3:g}ms ± {self.jitter_s * 1e3:g}ms, "
                f"loss {self.loss * 100:g}%")


def _seconds(text: str, spec: str) -> float:
    m = re.fullmatch(r"([0-9.]+)\s*(us|ms|s)", text)
    if not m:
        raise ConfigError(f"--wan '{spec}': time '{text}' must look like 50ms")
    return float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)]


@dataclass
class LinkStats:
    bytes_up: int = 0  # island -> coordinator
    bytes_down: int = 0  # coordinator -> island
    timeline: dict[int, int] = field(default_factory=dict)  # 100 ms bucket -> bytes (both ways)
    corrupted: int = 0  # segments whose bytes were flipped in flight
    cut_connections: int = 0  # connections reset or refused by a partition

    def add(self, n: int, up: bool, t0: float) -> None:
        if up:
            self.bytes_up += n
        else:
            self.bytes_down += n
        bucket = int((time.monotonic() - t0) * 10)
        self.timeline[bucket] = self.timeline.get(bucket, 0) + n

    @property
    def total(self) -> int:
        return self.bytes_up + self.bytes_down

    def peak_bits_per_s(self, window_s: float = 1.0) -> float:
        """Highest rate over any `window_s` window of the timeline."""
        if not self.timeline:
            return 0.0
        width = max(1, int(window_s * 10))
        last = max(self.timeline)
        series = [self.timeline.get(i, 0) for i in range(last + 1)]
        best = running = sum(series[:width])
        for i in range(width, len(series)):
            running += series[i] - series[i - width]
            best = max(best, running)
        return best * 8 / window_s


class LinkProxy:
    """Listens on `listen_host:0`, forwards every connection to `target`, counts bytes."""

    def __init__(self, target: str, listen_host: str = "127.0.0.1", wan: WanSpec | None = None,
                 seed: int = 0) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listen_host = listen_host
        self.wan = wan
        self.rng = random.Random(seed)
        self.stats = LinkStats()
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"link->{target}", daemon=True)
        self._t0 = time.monotonic()
        self._partitioned = False
        self._dropping = False  # a partition that drops bytes instead of resetting (see `partition`)
        self._corrupt = 0  # segments still to corrupt
        self._corrupt_min = 4096
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return f"{self.listen_host}:{self.port}"

    def start(self) -> LinkProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("link proxy did not start within 10 s")
        return self

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._serve())
        self._loop.run_forever()
        self._loop.close()

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.listen_host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()

    def partition(self, on: bool, drop: bool = False) -> None:
        """Cut the link or restore it. By default a cut resets its connections and refuses new ones;
        with `drop` nothing is closed: bytes stop flowing both ways and new connections lead nowhere,
        as on a path that drops every packet (the peers notice only by their own timeouts). Restoring
        a dropped link resets what it held, so the peers reconnect."""
        reset = (on and not drop) or (not on and self._dropping)
        self._dropping = on and drop
        self._partitioned = on
        if reset and self._loop is not None:
            self._loop.call_soon_threadsafe(self._cut)

    def _cut(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
            self.stats.cut_connections += 1
        self._writers.clear()

    def corrupt_next(self, segments: int = 1, min_bytes: int = 4096) -> None:
        """Flip a byte in each of the next `segments` upstream segments of at least `min_bytes`."""
        self._corrupt_min = min_bytes
        self._corrupt += segments

    def _tamper(self, data: bytes, up: bool) -> bytes:
        if not (up and self._corrupt > 0 and len(data) >= self._corrupt_min):
            return data
        self._corrupt -= 1
        self.stats.corrupted += 1
        flipped = bytearray(data)
        flipped[len(data) * 7 // 8] ^= 0xFF  # late in a large segment: a chunk's data, not the header
        return bytes(flipped)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._partitioned:
            self.stats.cut_connections += 1
            if not self._dropping:
                writer.transport.abort()
                return
            self._writers.add(writer)  # held, silent, until the link is restored
            try:
                while await reader.read(1 << 16):
                    pass
            except (ConnectionError, OSError):
                pass
            self._writers.discard(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer, True), self._pipe(up_reader, writer, False),
                             return_exceptions=True)
        self._writers.difference_update((writer, up_writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: bool) -> None:
        if self.wan is None:
            try:
                while data := await reader.read(1 << 16):
                    if self._dropping:
                        continue
                    self.stats.add(len(data), up, self._t0)
                    writer.write(self._tamper(data, up))
                    await writer.drain()
            finally:
                writer.close()
            return
        # Shaped: the reader stamps each segment with its delivery time; the writer delivers in order.
        # The bounded queue is the link's buffer: a full one stops reading (TCP back-pressure).
        segment = max(1500, int(self.wan.rate_bps / 8 / 100))  # ~10 ms of link time per segment
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(maxsize=64)
        deliver = asyncio.create_task(self._deliver(queue, writer, up))
        free_at = last = 0.0
        try:
            while data := await reader.read(segment):
                if self._dropping:
                    continue
                now = time.monotonic()
                free_at = max(now, free_at) + len(data) * 8 / self.wan.rate_bps
                at = free_at + self.wan.latency_s + self.rng.uniform(0, self.wan.jitter_s)
                if self.wan.loss and self.rng.random() < self.wan.loss:
                    at += self.wan.rto_s
                last = max(last, at)
                await queue.put((last, self._tamper(data, up)))
        finally:
            await queue.put(None)
            await deliver

    async def _deliver(self, queue: asyncio.Queue, writer: asyncio.StreamWriter, up: bool) -> None:
        broken = False  # after a write error keep draining, so the reader never blocks on a full queue
        while (item := await queue.get()) is not None:
            if broken:
                continue
            at, data = item
            delay = at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.stats.add(len(data), up, self._t0)
            try:
                writer.write(data)
                await writer.drain()
            except (ConnectionError, OSError):
                broken = True
        writer.close()

    def stop(self) -> None:
        """Close the listener, cancel every connection's tasks, stop and close the loop."""
        if self._loop is None or not self._thread.is_alive():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        self._thread.join(timeout=5)
