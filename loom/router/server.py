"""Runs the router app under uvicorn with TGI-style graceful drain.

On the first SIGTERM/SIGINT the router keeps listening but answers new generation requests with 503 and reports
unhealthy, lets the requests already accepted finish (up to the graceful-termination timeout), then exits with
status 0. A second signal exits at once.
"""

from __future__ import annotations

import logging
import threading
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

logger = logging.getLogger("loom.router")
DRAIN_POLL_SECONDS = 0.1


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout: float):
        super().__init__(config)
        self.app = app
        self.drain_timeout = drain_timeout
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # NOTE: not recorded in _captured_signals, so uvicorn does not re-raise it after shutdown: a drained
        # router exits 0, which is how the launcher tells a clean stop from a crash.
        if self._draining:
            self.force_exit = self.should_exit = True
            return
        self._draining = True
        state = getattr(self.app.state, "loom", None)
        if state is None:  # still starting: nothing accepted yet
            self.should_exit = True
            return
        state.draining = True
        logger.info("draining: %d request(s) in flight, up to %ss", state.in_flight, self.drain_timeout)
        threading.Thread(target=self._exit_when_drained, args=(state,), name="drain", daemon=True).start()

    def _exit_when_drained(self, state) -> None:
        deadline = time.monotonic() + self.drain_timeout
        while state.in_flight and time.monotonic() < deadline:
            time.sleep(DRAIN_POLL_SECONDS)
        if state.in_flight:
            logger.warning("graceful termination timeout: %d request(s) still running are cut off",
                           state.in_flight)
        self.should_exit = True


def serve(app: FastAPI, host: str, port: int, drain_timeout: float) -> None:
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=5)
    DrainingServer(config, app, drain_timeout).run()
