"""Run a :class:`MaceFieldServer` on a background thread with its own event loop.

For tests, benchmarks and notebooks that need a real server (real sockets,
real gRPC) inside the current process::

    with BackgroundServer(config, models=[served]) as srv:
        channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, List, Optional

from .app import MaceFieldServer
from .config import ServerConfig
from .registry import ServedModel


class BackgroundServer:
    """A :class:`MaceFieldServer` (``config``, ``models`` and ``server_options`` as it takes them) on a thread."""

    def __init__(self, config: ServerConfig, models: Optional[List[ServedModel]] = None, *, timeout: float = 120.0,
                 **server_options: Any):
        self.config = config
        self.models = models
        self.server_options = server_options
        self.timeout = timeout
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="macefield-server", daemon=True)
        self.server: Optional[MaceFieldServer] = None

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(self.timeout)

    async def _make(self):
        self.server = MaceFieldServer(self.config, self.models, **self.server_options)
        await self.server.start()
        await self.server.load()

    def start(self) -> "BackgroundServer":
        self.thread.start()
        self._call(self._make())
        return self

    def _started(self) -> MaceFieldServer:
        if self.server is None:
            raise RuntimeError("BackgroundServer not started: call start() or use it in a with block")
        return self.server

    @property
    def port(self) -> int:
        port = self._started().port
        if port is None:
            raise RuntimeError("BackgroundServer has no gRPC port: its server did not start")
        return port

    @property
    def metrics_port(self) -> Optional[int]:
        return self._started().metrics_port

    def stop(self, grace: float = 5.0) -> None:
        if self.server is not None:
            self._call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(self.timeout)
        self.loop.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
