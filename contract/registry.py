"""Which models have workers: what each model declared, and which workers are alive now."""

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


def get_model(client: redis.Redis, model: str) -> ModelInfo | None:
    raw = client.get(keys.model_key(model))
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
