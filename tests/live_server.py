"""Helpers for tests that drive `larvseg serve` in a real browser (imported by the test modules beside it)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


def chromium() -> str | None:
    """The system's Chromium (or $LARVSEG_CHROMIUM), None when there is none."""
    for candidate in (os.environ.get("LARVSEG_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


@contextmanager
def serving(service) -> Iterator[str]:
    """Serve ``service`` (a SegmentationService) with uvicorn on a free local port; yields its URL, then
    stops the server and closes the service."""
    import uvicorn

    from larvseg.serve import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        service.close()
        sock.close()
