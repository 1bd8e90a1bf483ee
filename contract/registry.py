"""Which models have workers: what each model declared, and which workers are alive now.

Two records can describe a model. A worker's *registration* (``model_key``) says what it
serves; every worker rewrites it on each heartbeat, so a Redis that lost its data (a restart
without persistence) knows the model again within one heartbeat. An operator's *declaration*
(``declared_key``, ``producer models declare``) lets producers queue jobs for a model before
any worker runs (a pool scaled to zero). Neither overwrites the other; while a registration
exists it is the truth, and the declaration is the fallback.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import redis

from contract import defaults, keys
from contract.errors import MalformedRecord


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
    pipe.set(keys.model_key(info.name), info.encode())
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


def declare_model(client: redis.Redis, name: str, num_classes: int, weights: str = "") -> ModelInfo:
    """Let producers accept jobs for ``name`` before any worker serves it."""
    if num_classes < 1:
        raise ValueError("the number of classes must be at least 1")
    info = ModelInfo(name, weights or "declared", False, num_classes, "none", declared=True)
    pipe = client.pipeline(transaction=False)
    pipe.set(keys.declared_key(name), info.encode())
    pipe.sadd(keys.models_set(), name)
    pipe.execute()
    return info


def get_model(client: redis.Redis, model: str) -> ModelInfo | None:
    """A worker's registration of ``model``, else its declaration, else None."""
    registered, declared = client.mget(keys.model_key(model), keys.declared_key(model))
    raw = registered if registered is not None else declared
    return None if raw is None else ModelInfo.decode(raw)


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


def queue_depth(client: redis.Redis, model: str) -> int:
    """Messages waiting in ``model``'s Celery queue (each carries up to CHUNK_SIZE jobs)."""
    return int(client.llen(keys.queue_name(model)))
