"""The worker's own HTTP endpoint: ``/metrics``, ``/healthz`` (liveness), ``/readyz`` (readiness).

It starts before the model loads, so an orchestrator sees a live but unready worker while the
model warms up. Ready means warm *and* consuming: Celery's ``worker_ready`` signal, sent once
the consumer has started, flips it on; ``worker_shutting_down`` flips it off for the drain.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from celery import signals
from celery.utils.dispatch import Signal
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from contract.gauges import QueueCollector

if TYPE_CHECKING:
    from worker.app import Runtime

log = logging.getLogger(__name__)


class Health:
    """What the probes answer; moved along by ``attach`` and by Celery's signals."""

    def __init__(self) -> None:
        self.runtime: Runtime | None = None
        self.registry = CollectorRegistry()
        self.consuming = False
        self.stopping = False

    def attach(self, runtime: Runtime) -> None:
        """The model is warm: serve its metrics, plus queue and device gauges read on scrape."""
        model = runtime.settings.model
        gauges = QueueCollector(runtime.redis, lambda: [model], runtime.service.store)
        runtime.metrics.registry.register(gauges)
        runtime.metrics.watch_device(runtime.info.device)
        self.registry = runtime.metrics.registry
        self.runtime = runtime
        for signal, handler in self._handlers():
            signal.connect(handler, weak=False)

    def detach(self) -> None:
        """Stop listening to Celery's signals, which are process-wide."""
        for signal, handler in self._handlers():
            signal.disconnect(handler)

    def _handlers(self) -> list[tuple[Signal, Callable[..., None]]]:
        return [
            (signals.worker_ready, self._on_ready),
            (signals.worker_shutting_down, self._on_stopping),
            (signals.worker_shutdown, self._on_stopping),
        ]

    def _on_ready(self, **_: object) -> None:
        self.consuming = True
        log.info("ready: model warm and consuming")

    def _on_stopping(self, **_: object) -> None:
        self.stopping = True

    def live(self) -> tuple[bool, str]:
        """Up, and once set up, every pipeline stage thread still running."""
        if self.runtime is None:
            return True, "loading the model"
        dead = self.runtime.pipeline.dead_stages()
        return (False, f"pipeline threads died: {', '.join(dead)}") if dead else (True, "alive")

    def ready(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "shutting down"
        if self.runtime is None:
            return False, "loading the model"
        if not self.consuming:
            return False, "model warm; consumer not started yet"
        alive, why = self.live()
        return alive, "ready" if alive else why


class HealthServer:
    """A small threaded HTTP server; probes must answer even while the device is busy."""

    def __init__(self, host: str, port: int, health: Health | None = None) -> None:
        self.health = health or Health()
        self.httpd = ThreadingHTTPServer((host, port), _handler(self.health))
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="health-http", daemon=True
        )

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> HealthServer:
        self._thread.start()
        log.info("metrics and health on port %d", self.port)
        return self

    def attach(self, runtime: Runtime) -> None:
        self.health.attach(runtime)

    def close(self) -> None:
        """Stop serving and listening to Celery's signals."""
        self.health.detach()
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler(health: Health) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(health.registry), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/readyz"):
                ok, why = health.live() if path == "/healthz" else health.ready()
                self._send(200 if ok else 503, f"{why}\n".encode(), "text/plain")
            else:
                self._send(404, b"try /metrics, /healthz or /readyz\n", "text/plain")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Probes arrive every few seconds; logging each would drown the worker's log."""

    return Handler
