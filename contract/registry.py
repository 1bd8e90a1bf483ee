"""Which models have workers: what each model version declared, and which workers are alive.

A model *name* may be served in several *versions* at once: a version is the weights' identity,
a short hash of the weights ID and the class count, so a worker with other weights or another
class count registers another version instead of overwriting. Each version has its own queues
(``keys.queue_names``), so a job only ever reaches the version it was checked against.

Two records can describe a version. A worker's *registration* (``model_key``) says what it
serves; every worker rewrites it on each heartbeat, so a Redis that lost its data (a restart
without persistence) knows the version again within one heartbeat. An operator's *declaration*
(``declared_key``, ``producer models declare``) names the model's *default version*, where
jobs that do not pin one go, and lets producers queue jobs for it before any worker runs (a
pool scaled to zero). While a registration of that version exists it is the truth, and the
declaration is the fallback. Without a declaration the default is the newest registered version
(the one first seen last), so a rollout moves new jobs to the new weights while the old
version's workers drain what was queued for them.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass

import redis

from contract import defaults, keys
from contract.errors import MalformedRecord


def model_version(weights: str, num_classes: int) -> str:
    """The version of a model: a short hash of its weights ID and class count."""
    return hashlib.sha256(f"{weights}\x00{num_classes}".encode()).hexdigest()[:10]


@dataclass(frozen=True)
class ModelInfo:
    """What a worker declares about the model it serves; producers validate requests with it."""

    name: str
    weights: str
    random_weights: bool
    num_classes: int
    device: str = "cpu"
    # True for an operator's declaration: no worker has said this yet.
    declared: bool = False
    # Derived from weights and num_classes when not given (a declaration may name any version).
    version: str = ""

    def __post_init__(self) -> None:
        if not self.version:
            object.__setattr__(self, "version", model_version(self.weights, self.num_classes))

    @property
    def ref(self) -> str:
        """``name@version``: what a job pins to reach exactly this version."""
        return f"{self.name}@{self.version}"

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: str | bytes) -> ModelInfo:
        try:
            return cls(**json.loads(raw))
        except (ValueError, TypeError) as e:
            raise MalformedRecord(f"model record does not follow the schema: {e}") from e


def register_model(client: redis.Redis, info: ModelInfo) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.set(keys.model_key(info.name, info.version), info.encode())
    # NX: the first registration's time stays, so "newest" means first seen last.
    pipe.zadd(keys.versions_key(info.name), {info.version: time.time()}, nx=True)
    pipe.sadd(keys.models_set(), info.name)
    pipe.execute()


def heartbeat(
    client: redis.Redis,
    model: str,
    worker_id: str,
    state: dict[str, object],
    ttl_s: int = defaults.HEARTBEAT_TTL_S,
) -> None:
    """Say that ``worker_id`` is alive and warm; the key vanishes ``ttl_s`` after the last call."""
    client.set(keys.heartbeat_key(model, worker_id), json.dumps(state), ex=ttl_s)


def retire(client: redis.Redis, model: str, worker_id: str) -> None:
    client.delete(keys.heartbeat_key(model, worker_id))


def declare_model(
    client: redis.Redis, name: str, num_classes: int, weights: str = "", version: str = ""
) -> ModelInfo:
    """Make ``version`` (by default the one ``weights`` and ``num_classes`` make) ``name``'s
    default, and let producers accept jobs for it before any worker serves it."""
    if num_classes < 1:
        raise ValueError("the number of classes must be at least 1")
    info = ModelInfo(name, weights or "declared", False, num_classes, "none", True, version)
    pipe = client.pipeline(transaction=False)
    pipe.set(keys.declared_key(name), info.encode())
    pipe.sadd(keys.models_set(), name)
    pipe.execute()
    return info


def get_model(client: redis.Redis, model: str, version: str | None = None) -> ModelInfo | None:
    """``version`` of ``model`` (by default its default version): a worker's registration,
    else the operator's declaration of that version, else None."""
    declared = _declaration(client, model)
    if version is None:
        version = declared.version if declared is not None else newest_version(client, model)
    if version is None:
        return None
    raw = client.get(keys.model_key(model, version))
    if raw is not None:
        return ModelInfo.decode(raw)
    return declared if declared is not None and declared.version == version else None


def _declaration(client: redis.Redis, model: str) -> ModelInfo | None:
    raw = client.get(keys.declared_key(model))
    return None if raw is None else ModelInfo.decode(raw)


def newest_version(client: redis.Redis, model: str) -> str | None:
    newest = _members(client, keys.versions_key(model), -1, -1)
    return newest[0] if newest else None


def versions(client: redis.Redis, model: str) -> list[str]:
    """Every version of ``model`` registered or declared, oldest first."""
    found = _members(client, keys.versions_key(model), 0, -1)
    declared = _declaration(client, model)
    if declared is not None and declared.version not in found:
        found.append(declared.version)
    return found


def model_versions(client: redis.Redis, model: str) -> list[ModelInfo]:
    """What is known of each version of ``model``, oldest first."""
    found = (get_model(client, model, v) for v in versions(client, model))
    return [info for info in found if info is not None]


def known_models(client: redis.Redis) -> list[str]:
    return sorted(keys.text(m) for m in client.smembers(keys.models_set()))


def live_workers(client: redis.Redis, model: str = "*") -> dict[str, dict[str, object]]:
    """Heartbeat payloads of live workers, by heartbeat key."""
    found = list(client.scan_iter(match=keys.heartbeat_pattern(model), count=500))
    if not found:
        return {}
    values = client.mget(found)
    return {
        keys.text(k): json.loads(v) for k, v in zip(found, values, strict=True) if v is not None
    }


def queues(client: redis.Redis, model: str) -> list[str]:
    """Every queue of every version of ``model``."""
    return [q for v in versions(client, model) for q in keys.queue_names(model, v)]


def queue_depth(client: redis.Redis, model: str) -> int:
    """Messages waiting in all of ``model``'s queues (each carries up to CHUNK_SIZE jobs)."""
    pipe = client.pipeline(transaction=False)
    for queue in queues(client, model):
        pipe.llen(queue)
    return sum(int(n) for n in pipe.execute())


def _members(client: redis.Redis, key: str, start: int, end: int) -> list[str]:
    """Members of the sorted set ``key`` from ``start`` to ``end``, lowest score first."""
    return [keys.text(v) for v in client.zrange(key, start, end) if isinstance(v, (bytes, str))]
