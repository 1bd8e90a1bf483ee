"""A Redis Sentinel on loopback for the tests that reach Redis through one."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import redis
from redis.sentinel import MasterNotFoundError, Sentinel

from demo.stack import free_port

SERVICE = "mymaster"


class SentinelProcess:
    """``redis-server sentinel.conf --sentinel`` on a free loopback port, watching one primary."""

    def __init__(self, workdir: Path, primary_port: int) -> None:
        self.port = free_port()
        self.conf = workdir / "sentinel.conf"
        self.conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {workdir}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 1\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
            f"sentinel failover-timeout {SERVICE} 10000\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SentinelProcess:
        exe = shutil.which("redis-server")
        assert exe is not None, "redis-server is not installed"
        self.proc = subprocess.Popen(
            [exe, str(self.conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return self

    def primary_port(self) -> int | None:
        """The primary's port as clients are told it (none while it is down or failing over)."""
        try:
            return Sentinel([("127.0.0.1", self.port)]).discover_master(SERVICE)[1]
        except (MasterNotFoundError, redis.ConnectionError):
            return None

    def knows_replicas(self) -> int:
        client = redis.Redis(port=self.port, socket_timeout=2)
        try:
            return len(client.sentinel_slaves(SERVICE))
        except redis.ConnectionError:
            return 0
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
