"""Job records in Redis: create, read, claim and finish, each a single round trip for many jobs.

State changes run as Lua scripts so that a redelivered message can never move a finished job
backwards or write its result twice.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from string import Template

import redis

from contract import defaults, keys
from contract.errors import InvalidRequest, MalformedRecord, PoisonJob
from contract.job import FAILED, FINAL, QUEUED, RUNNING, Job


class ClaimState(str, Enum):
    """What claiming one job found; the value is what the claim script answers."""

    CLAIMED = "claimed"  # now running on this worker
    SUSPECT = "suspect"  # started before (its worker may have died on it); not claimed
    ALREADY_FINAL = "final"  # done or failed already; not claimed
    POISONED = "poisoned"  # started too often: failed as a poison pill instead
    MISSING = "missing"  # no record (never created, or expired)
    CORRUPT = "corrupt"  # the record is not a job

    def __str__(self) -> str:
        return self.value


CLAIMED = ClaimState.CLAIMED
SUSPECT = ClaimState.SUSPECT
ALREADY_FINAL = ClaimState.ALREADY_FINAL
POISONED = ClaimState.POISONED
MISSING = ClaimState.MISSING
CORRUPT = ClaimState.CORRUPT


# Appends the final ``job`` to the events stream KEYS[3], capped at about ARGV[6] entries.
_EVENT = (
    "redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'id', job.id, "
    "'status', job.status, 'batch', type(job.batch) == 'string' and job.batch or '')"
)


def _lua(script: str) -> str:
    """``script`` with the statuses of contract.job and the error types of contract.errors.

    ``$job_is_final`` tests the decoded record ``job``; ``$queued``, ``$running`` and ``$failed``
    are status literals, ``$poison`` and ``$invalid`` error types.
    """
    is_final = " or ".join(f"job.status == '{status.value}'" for status in sorted(FINAL))
    return Template(script).substitute(
        job_is_final=f"({is_final})",
        queued=f"'{QUEUED.value}'",
        running=f"'{RUNNING.value}'",
        failed=f"'{FAILED.value}'",
        poison=f"'{PoisonJob.type}'",
        invalid=f"'{InvalidRequest.type}'",
        event=_EVENT,
    )


# KEYS[1] job key, KEYS[2] stats hash, KEYS[3] events stream. ARGV: now, worker, max_attempts,
# mode ("fresh" | "any"), channel, events cap.
# A record that is JSON but cannot become a Job (no uri, say) is failed at once, naming the field.
# "fresh" claims only never-started jobs and answers "suspect" for the rest, so that a job
# which may have killed a worker is retried on its own rather than beside its neighbours.
_CLAIM = _lua("""
local raw = redis.call('GET', KEYS[1])
if not raw then return {'missing', ''} end
local ok, job = pcall(cjson.decode, raw)
if not ok or type(job) ~= 'table' or job[1] ~= nil then return {'corrupt', raw} end
if $job_is_final then return {'final', raw} end
local missing = nil
for _, f in ipairs({'id', 'uri', 'model'}) do
  if type(job[f]) ~= 'string' then missing = missing or f; job[f] = job[f] or '' end
end
if type(job.top_k) ~= 'number' then missing = missing or 'top_k'; job.top_k = 0 end
if job.status ~= $queued and job.status ~= $running then missing = missing or 'status' end
if missing then
  if job.id == '' then job.id = string.match(KEYS[1], ':job:(.*)$$') end
  job.status = $failed
  job.finished = tonumber(ARGV[1])
  job.predictions = cjson.null
  job.error = {type = $invalid, message = 'the job record has no valid "' ..
    missing .. '" field, so it cannot be run'}
  raw = cjson.encode(job)
  redis.call('SET', KEYS[1], raw, 'KEEPTTL')
  redis.call('HINCRBY', KEYS[2], 'failed', 1)
  redis.call('PUBLISH', ARGV[5], cjson.encode({job.id}))
  $event
  return {'final', raw}
end
local attempts = tonumber(job.attempts) or 0
if ARGV[4] == 'fresh' and attempts > 0 then return {'suspect', raw} end
if attempts >= tonumber(ARGV[3]) then
  job.status = $failed
  job.finished = tonumber(ARGV[1])
  job.predictions = cjson.null
  job.error = {type = $poison, message = 'the job was started ' .. attempts ..
    ' times and each time its worker died before finishing it; giving up'}
  raw = cjson.encode(job)
  redis.call('SET', KEYS[1], raw, 'KEEPTTL')
  redis.call('HINCRBY', KEYS[2], 'failed', 1)
  redis.call('PUBLISH', ARGV[5], cjson.encode({job.id}))
  $event
  return {'poisoned', raw}
end
job.attempts = attempts + 1
job.status = $running
job.started = tonumber(ARGV[1])
job.worker = ARGV[2]
raw = cjson.encode(job)
redis.call('SET', KEYS[1], raw, 'KEEPTTL')
return {'claimed', raw}
""")

# KEYS[1] job key, KEYS[2] stats hash, KEYS[3] events stream. ARGV[1] final record, ARGV[2] its
# status, ARGV[3] its attempts, ARGV[4] its ID, ARGV[5] its batch ('' for none), ARGV[6] events
# cap. Writes only over a job that is not final yet: a result is stored once. If a later delivery
# started the job again meanwhile, the stored record keeps that higher attempt count.
_FINISH = _lua("""
local raw = redis.call('GET', KEYS[1])
if not raw then return -1 end
local ok, job = pcall(cjson.decode, raw)
if ok and type(job) == 'table' and $job_is_final then
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
job = {id = ARGV[4], status = ARGV[2], batch = ARGV[5]}
$event
return 1
""")


@dataclass(frozen=True)
class Claim:
    """What claiming one job found; ``job`` is None when the state is MISSING or CORRUPT."""

    job_id: str
    state: ClaimState
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
        stats, events = keys.stats_key(model), keys.events_stream()
        events_cap = defaults.EVENTS_MAX_LEN
        args: list[str | float] = [
            now,
            worker,
            max_attempts,
            mode,
            keys.finished_channel(),
            events_cap,
        ]
        for job_id in job_ids:
            self._claim(keys=[keys.job_key(job_id), stats, events], args=args, client=pipe)
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
                keys=[keys.job_key(job.id), stats, keys.events_stream()],
                args=[job.encode(), job.status, job.attempts, job.id, "", defaults.EVENTS_MAX_LEN],
                client=pipe,
            )
        pipe.publish(keys.finished_channel(), json.dumps([j.id for j in jobs]))
        return [r == 1 for r in pipe.execute()[:-1]]

    def stats(self, model: str) -> dict[str, int]:
        return read_stats(self.redis, model)


def read_stats(client: redis.Redis, model: str) -> dict[str, int]:
    """``model``'s counters: jobs done, failed, duplicate results."""
    raw = client.hgetall(keys.stats_key(model))
    return {keys.text(k): int(v) for k, v in raw.items()}


def _raise_unless_wrongtype(replies: Sequence[object]) -> None:
    """Only WRONGTYPE says something about the record; any other error (out of memory, a
    read-only replica, a lost connection, a busy script) says the claim did not happen."""
    for reply in replies:
        if isinstance(reply, Exception) and not str(reply).startswith("WRONGTYPE"):
            raise reply


def _claim(job_id: str, reply: Sequence[bytes | str] | Exception) -> Claim:
    if isinstance(reply, Exception):  # WRONGTYPE: the key holds something else
        return Claim(job_id, CORRUPT, None)
    state, raw = (keys.text(x) for x in reply)
    if state in (MISSING, CORRUPT):
        return Claim(job_id, ClaimState(state), None)
    try:
        return Claim(job_id, ClaimState(state), Job.decode(raw))
    except MalformedRecord:
        return Claim(job_id, CORRUPT, None)
