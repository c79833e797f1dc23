"""An island's link to the coordinator, as a TCP proxy on loopback that counts real bytes.

Every byte of the real gRPC connection (HTTP/2 framing included) passes through the proxy, so
the counts are what would cross the WAN. A timeline of bytes per 100 ms is kept for plots and
peak rates.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field


@dataclass
class LinkStats:
    bytes_up: int = 0  # island -> coordinator
    bytes_down: int = 0  # coordinator -> island
    timeline: dict[int, int] = field(default_factory=dict)  # 100 ms bucket -> bytes (both ways)

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

    def __init__(self, target: str, listen_host: str = "127.0.0.1") -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listen_host = listen_host
        self.stats = LinkStats()
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"link->{target}", daemon=True)
        self._t0 = time.monotonic()

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

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.listen_host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer, True), self._pipe(up_reader, writer, False),
                             return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: bool) -> None:
        try:
            while data := await reader.read(1 << 16):
                self.stats.add(len(data), up, self._t0)
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    def stop(self) -> None:
        if self._loop is None:
            return
        def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            self._loop.stop()
        self._loop.call_soon_threadsafe(shutdown)
        self._thread.join(timeout=5)
