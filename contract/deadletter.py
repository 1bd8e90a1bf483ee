"""The dead-letter list: what could not be run, kept for a person to read, replay or purge.

Bounded twice: by length (``DEAD_LETTER_MAX_ENTRIES``) and by age (``DEAD_LETTER_MAX_AGE_S``,
from each entry's ``at``), both enforced by the same script that appends, so no writer can
forget. Entries are JSON objects, oldest first; index 0 is the oldest.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from contract import defaults, keys

# KEYS[1] the list. ARGV: cap, cutoff (unix seconds), then the entries to append.
# Appends, keeps the newest ``cap``, then drops from the head entries written before ``cutoff``.
_APPEND = """
for i = 3, #ARGV do redis.call('RPUSH', KEYS[1], ARGV[i]) end
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[1]), -1)
local cutoff = tonumber(ARGV[2])
for _ = 1, 1000 do
  local head = redis.call('LINDEX', KEYS[1], 0)
  if not head then break end
  local ok, entry = pcall(cjson.decode, head)
  local at = ok and type(entry) == 'table' and tonumber(entry.at)
  if at and at >= cutoff then break end
  redis.call('LPOP', KEYS[1])
end
return redis.call('LLEN', KEYS[1])
"""


def append(
    client: redis.Redis,
    *entries: Mapping[str, Any],
    now: float | None = None,
    max_entries: int = defaults.DEAD_LETTER_MAX_ENTRIES,
    max_age_s: float = defaults.DEAD_LETTER_MAX_AGE_S,
) -> int:
    """Append ``entries`` (each stamped with ``at``), trim the list; returns its length."""
    now = time.time() if now is None else now
    raws = [json.dumps({"at": now, **entry}, default=str) for entry in entries]
    script = client.register_script(_APPEND)
    return int(script(keys=[keys.dead_letter_key()], args=[max_entries, now - max_age_s, *raws]))


@dataclass(frozen=True)
class Entry:
    index: int
    raw: str
    data: dict[str, Any]


def entries(client: redis.Redis, limit: int | None = None) -> list[Entry]:
    """The oldest ``limit`` entries (every one when None), with their list index."""
    raws = client.lrange(keys.dead_letter_key(), 0, -1 if limit is None else limit - 1)
    return [Entry(i, _text(raw), _parsed(raw)) for i, raw in enumerate(raws)]


def remove(client: redis.Redis, done: Sequence[Entry]) -> None:
    """Remove entries (by value: indexes move as other writers trim the list)."""
    pipe = client.pipeline(transaction=False)
    for entry in done:
        pipe.lrem(keys.dead_letter_key(), 1, entry.raw)
    pipe.execute()


def purge(client: redis.Redis) -> int:
    """Empty the list; returns how many entries it held."""
    pipe = client.pipeline(transaction=True)
    pipe.llen(keys.dead_letter_key())
    pipe.delete(keys.dead_letter_key())
    return int(pipe.execute()[0])


def classify_call(entry: Entry) -> tuple[str, list[str]] | None:
    """(queue, job IDs) of an entry that kept a classify message; None for any other entry."""
    queue, raw = entry.data.get("queue"), entry.data.get("message")
    if not isinstance(queue, str) or not isinstance(raw, str):
        return None
    try:
        body = json.loads(base64.b64decode(json.loads(raw)["body"]))
        ids = body[0][0]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    if isinstance(ids, list) and ids and all(isinstance(i, str) for i in ids):
        return queue, ids
    return None


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw


def _parsed(raw: bytes | str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError:
        return {"unreadable": _text(raw)}
    return data if isinstance(data, dict) else {"value": data}
