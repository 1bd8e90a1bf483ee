"""Job records in Redis: create, read, claim and finish, each a single round trip for many jobs.

State changes run as Lua scripts so that a redelivered message can never move a finished job
backwards or write its result twice.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from contract import defaults, keys
from contract.errors import DecodeError
from contract.job import Job

# KEYS[1] job key. ARGV: now, worker, max_attempts, mode ("fresh" | "any"), channel.
# A record that is JSON but cannot become a Job (no uri, say) is failed at once, naming the field.
# "fresh" claims only never-started jobs and answers "suspect" for the rest, so that a job
# which may have killed a worker is retried on its own rather than beside its neighbours.
_CLAIM = """
local raw = redis.call('GET', KEYS[1])
if not raw then return {'missing', ''} end
local ok, job = pcall(cjson.decode, raw)
if not ok or type(job) ~= 'table' or job[1] ~= nil then return {'corrupt', raw} end
if job.status == 'done' or job.status == 'failed' then return {'final', raw} end
local missing = nil
for _, f in ipairs({'id', 'uri', 'model'}) do
  if type(job[f]) ~= 'string' then missing = missing or f; job[f] = job[f] or '' end
end
if type(job.top_k) ~= 'number' then missing = missing or 'top_k'; job.top_k = 0 end
if job.status ~= 'queued' and job.status ~= 'running' then missing = missing or 'status' end
if missing then
  if job.id == '' then job.id = string.match(KEYS[1], ':job:(.*)$') end
  job.status = 'failed'
  job.finished = tonumber(ARGV[1])
  job.predictions = cjson.null
  job.error = {type = 'invalid_request', message = 'the job record has no valid "' ..
    missing .. '" field, so it cannot be run'}
  raw = cjson.encode(job)
  redis.call('SET', KEYS[1], raw, 'KEEPTTL')
  redis.call('HINCRBY', KEYS[2], 'failed', 1)
  redis.call('PUBLISH', ARGV[5], cjson.encode({job.id}))
  return {'final', raw}
end
local attempts = tonumber(job.attempts) or 0
if ARGV[4] == 'fresh' and attempts > 0 then return {'suspect', raw} end
if attempts >= tonumber(ARGV[3]) then
  job.status = 'failed'
  job.finished = tonumber(ARGV[1])
  job.predictions = cjson.null
  job.error = {type = 'poison', message = 'the job was started ' .. attempts ..
    ' times and each time its worker died before finishing it; giving up'}
  raw = cjson.encode(job)
  redis.call('SET', KEYS[1], raw, 'KEEPTTL')
  redis.call('HINCRBY', KEYS[2], 'failed', 1)
  redis.call('PUBLISH', ARGV[5], cjson.encode({job.id}))
  return {'poisoned', raw}
end
job.attempts = attempts + 1
job.status = 'running'
job.started = tonumber(ARGV[1])
job.worker = ARGV[2]
raw = cjson.encode(job)
redis.call('SET', KEYS[1], raw, 'KEEPTTL')
return {'claimed', raw}
"""

# KEYS[1] job key, KEYS[2] stats hash. ARGV[1] final record, ARGV[2] its status, ARGV[3] its
# attempts. Writes only over a job that is not final yet: a result is stored once. If a later
# delivery started the job again meanwhile, the stored record keeps that higher attempt count.
_FINISH = """
local raw = redis.call('GET', KEYS[1])
if not raw then return -1 end
local ok, job = pcall(cjson.decode, raw)
if ok and type(job) == 'table' and (job.status == 'done' or job.status == 'failed') then
  redis.call('HINCRBY', KEYS[2], 'duplicate', 1)
  return 0
end
local record = ARGV[1]
if ok and type(job) == 'table' and (tonumber(job.attempts) or 0) > tonumber(ARGV[3]) then
  local final = cjson.decode(record)
  final.attempts = tonumber(job.attempts)
  record = cjson.encode(final)
end
redis.call('SET', KEYS[1], record, 'KEEPTTL')
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
return 1
"""

CLAIMED = "claimed"
SUSPECT = "suspect"
FINAL = "final"
POISONED = "poisoned"
MISSING = "missing"
CORRUPT = "corrupt"


@dataclass(frozen=True)
class Claim:
    """What claiming one job found: ``state`` is one of the constants above."""

    job_id: str
    state: str
    job: Job | None


class JobStore:
    """Reads and writes job records. Takes its Redis client from the caller."""

    def __init__(self, client: redis.Redis, ttl_s: int = defaults.JOB_TTL_S) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._claim = client.register_script(_CLAIM)
        self._finish = client.register_script(_FINISH)

    def create_many(self, jobs: Sequence[Job]) -> list[bool]:
        """Store new records; a job whose ID already exists is left as it is (False)."""
        pipe = self.redis.pipeline(transaction=False)
        for job in jobs:
            pipe.set(keys.job_key(job.id), job.encode(), nx=True, ex=self.ttl_s)
        return [bool(created) for created in pipe.execute()]

    def get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        if not job_ids:
            return []
        raws = self.redis.mget([keys.job_key(i) for i in job_ids])
        return [None if raw is None else Job.decode(raw) for raw in raws]

    def get(self, job_id: str) -> Job | None:
        return self.get_many([job_id])[0]

    def claim_many(
        self,
        job_ids: Sequence[str],
        model: str,
        now: float,
        worker: str,
        *,
        fresh_only: bool,
        max_attempts: int = defaults.MAX_ATTEMPTS,
    ) -> list[Claim]:
        """Mark jobs running and count an attempt, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        mode = "fresh" if fresh_only else "any"
        stats = keys.stats_key(model)
        for job_id in job_ids:
            args = [now, worker, max_attempts, mode, keys.finished_channel()]
            self._claim(keys=[keys.job_key(job_id), stats], args=args, client=pipe)
        replies = pipe.execute(raise_on_error=False)
        _raise_unless_wrongtype(replies)
        return [_claim(i, r) for i, r in zip(job_ids, replies, strict=True)]

    def finish_many(self, jobs: Sequence[Job]) -> list[bool]:
        """Store final records and announce them, in one round trip; True where written."""
        if not jobs:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for job in jobs:
            stats = keys.stats_key(job.model)
            self._finish(
                keys=[keys.job_key(job.id), stats],
                args=[job.encode(), job.status, job.attempts],
                client=pipe,
            )
        pipe.publish(keys.finished_channel(), json.dumps([j.id for j in jobs]))
        return [r == 1 for r in pipe.execute()[:-1]]

    def stats(self, model: str) -> dict[str, int]:
        raw = self.redis.hgetall(keys.stats_key(model))
        return {k.decode() if isinstance(k, bytes) else k: int(v) for k, v in raw.items()}


def _raise_unless_wrongtype(replies: Sequence[object]) -> None:
    """Only WRONGTYPE says something about the record; any other error (out of memory, a
    read-only replica, a lost connection, a busy script) says the claim did not happen."""
    for reply in replies:
        if isinstance(reply, Exception) and not str(reply).startswith("WRONGTYPE"):
            raise reply


def _claim(job_id: str, reply: Sequence[bytes | str] | Exception) -> Claim:
    if isinstance(reply, Exception):  # WRONGTYPE: the key holds something else
        return Claim(job_id, CORRUPT, None)
    state, raw = (x.decode() if isinstance(x, bytes) else x for x in reply)
    if state in (MISSING, CORRUPT):
        return Claim(job_id, state, None)
    try:
        return Claim(job_id, state, Job.decode(raw))
    except DecodeError:
        return Claim(job_id, CORRUPT, None)
