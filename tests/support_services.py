"""The service's side processes and a webhook receiver, for tests that run the whole service:
``python -m notifier run``, ``python -m sink run``, and a loopback receiver that verifies
each webhook's signature (Standard Webhooks) and counts it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook, WebhookVerificationError

from tests.faults_support import SETTLE_S, LoopbackServer
from tests.support import ROOT

# The example of the Standard Webhooks specification (and of every library implementing it).
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@dataclass(frozen=True)
class Post:
    webhook_id: str
    verified: bool
    body: str
    answered: int


class Receiver(LoopbackServer):
    """Verifies each POST's signature and counts it; answers 500 to the first ``fail_first``
    POSTs of each webhook-id, and may hold the very first POST until ``release``."""

    def __init__(self, fail_first: int = 0, hold_first: bool = False) -> None:
        self.fail_first = fail_first
        self.posts: list[Post] = []
        self.held = threading.Event()  # set once the first POST arrived (and is held)
        self.released = threading.Event()
        if not hold_first:
            self.released.set()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.handle_error = lambda *_: None  # type: ignore[method-assign]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def answer(self, headers: dict[str, str], body: str) -> int:
        try:
            Webhook(SPEC_SECRET).verify(body, headers)
            verified = True
        except WebhookVerificationError:
            verified = False
        with self._lock:
            webhook_id = headers.get("webhook-id", "")
            tries = sum(p.webhook_id == webhook_id for p in self.posts) + 1
            status = 401 if not verified else 500 if tries <= self.fail_first else 204
            first = not self.posts
            self.posts.append(Post(webhook_id, verified, body, status))
        if first:
            self.held.set()
            self.released.wait(SETTLE_S)
        return status

    def delivered(self) -> dict[str, str]:
        """Body by webhook-id, of every POST answered 2xx."""
        with self._lock:
            return {p.webhook_id: p.body for p in self.posts if p.answered < 300}


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            raw = self.rfile.read(length)
            if len(raw) < length:
                return  # cut short by a sender killed mid-POST: dropped, as any server would
            body = raw.decode()
            status = receiver.answer({k.lower(): v for k, v in self.headers.items()}, body)
            with contextlib.suppress(OSError):  # the sender may have been killed meanwhile
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


class SideProcess:
    """``python -m <package> run ARGS`` as its own process, as an operator starts it."""

    def __init__(self, package: str, args: list[str], env: dict[str, str]) -> None:
        self.command = [sys.executable, "-m", package, "run", *args]
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SideProcess:
        self.proc = subprocess.Popen(self.command, env=self.env, cwd=ROOT)
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(SETTLE_S)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(SETTLE_S)


class Sender(SideProcess):
    """The webhook sender, signing with the specification's example secret, retrying fast."""

    def __init__(self, redis_url: str) -> None:
        args = [
            "--redis-url", redis_url, "--allow-network", "127.0.0.0/8", "--retry-base-s", "0.2",
            "--retry-max-s", "1", "--timeout-s", "5", "--consumer", "test-sender",
        ]  # fmt: skip
        super().__init__("notifier", args, {"IMGCLS_WEBHOOK_SECRET": SPEC_SECRET})


class SinkProcess(SideProcess):
    """The results sink."""

    def __init__(self, redis_url: str, *args: str, env: dict[str, str] | None = None) -> None:
        args_ = ["--redis-url", redis_url, "--consumer", "test-sink", *args]
        super().__init__("sink", args_, env or {})
