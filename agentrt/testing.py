"""Helpers for testing code built on agentrt: run an app (ours or yours) on a real local server."""

from __future__ import annotations

import socket
import threading
import time

__all__ = ["LiveServer"]


class LiveServer:
    """A real uvicorn server for `app` on a free 127.0.0.1 port, in a thread."""

    def __init__(self, app) -> None:
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> LiveServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
