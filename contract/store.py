"""Job records in Redis: create, read, claim and finish, each a single round trip for many jobs.

State changes run as Lua scripts, one call per batch, so that a redelivered message can never
move a finished job backwards or write its result twice. The scripts read and write single
fields of the record's hash (``contract.record``), never the whole record.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from string import Template
from typing import Any

import redis
from redis.client import Pipeline
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from contract import defaults, keys, record
from contract.errors import InvalidRequest, MalformedRecord, PoisonJob
from contract.job import CANCELLED, DONE, EXPIRED, FAILED, FINAL, QUEUED, RUNNING, Job


class ClaimState(str, Enum):
    """What claiming one job found; the value is what the claim script answers."""

    CLAIMED = "claimed"  # now running on this worker
    SUSPECT = "suspect"  # started before (its worker may have died on it); not claimed
    ALREADY_FINAL = "final"  # final already (done, failed, cancelled, expired); not claimed
    EXPIRED = "expired"  # its deadline passed before it started: ended expired instead
    POISONED = "poisoned"  # started too often: failed as a poison pill instead
    MISSING = "missing"  # no record (never created, or expired)
    CORRUPT = "corrupt"  # the record is not a job

    def __str__(self) -> str:
        return self.value


CLAIMED = ClaimState.CLAIMED
SUSPECT = ClaimState.SUSPECT
ALREADY_FINAL = ClaimState.ALREADY_FINAL
POISONED = ClaimState.POISONED
EXPIRED_CLAIM = ClaimState.EXPIRED
MISSING = ClaimState.MISSING
CORRUPT = ClaimState.CORRUPT


class CancelOutcome(str, Enum):
    """What cancelling one job found and did; the value is what the cancel script answers."""

    CANCELLED = "cancelled"  # was queued: now cancelled, it never runs
    CANCELLED_RUNNING = "cancelled_running"  # was running: now cancelled, its result discarded
    ALREADY_FINAL = "final"  # final already (done, failed, cancelled, expired): left as it was
    MISSING = "missing"  # no record (never created, or expired)
    CORRUPT = "corrupt"  # the record is not a job

    def __str__(self) -> str:
        return self.value

    @property
    def cancelled(self) -> bool:
        return self in (CancelOutcome.CANCELLED, CancelOutcome.CANCELLED_RUNNING)


def _lua(script: str) -> str:
    """``script`` with the record's status codes and error types filled in.

    ``$queued`` ... ``$expired`` are status codes, ``$final`` a Lua set of the final ones,
    ``$poison`` and ``$invalid`` error types, ``$required`` the fields a job cannot run without
    (with the names messages give them), ``$piece`` the longest value one field holds,
    ``$id_from`` where the ID starts in a key, ``$ttl`` a final record's TTL when it has none.
    """
    code = record.STATUS_CODES
    return Template(script).substitute(
        required=", ".join(f"{{'{f}', '{_FIELD_NAMES[f]}'}}" for f in record.REQUIRED),
        queued=f"'{code[QUEUED]}'",
        running=f"'{code[RUNNING]}'",
        done=f"'{code[DONE]}'",
        failed=f"'{code[FAILED]}'",
        cancelled=f"'{code[CANCELLED]}'",
        expired=f"'{code[EXPIRED]}'",
        final="{" + ", ".join(f"['{code[s]}'] = true" for s in sorted(FINAL)) + "}",
        ttl=defaults.JOB_TTL_S,
        poison=f"'{PoisonJob.type}'",
        invalid=f"'{InvalidRequest.type}'",
        piece=record.PIECE,
        id_from=len(keys.job_key("")) + 1,
    )


# The Job field each required record field holds, as error messages name it.
_FIELD_NAMES = {
    record.URI: "uri",
    record.MODEL: "model",
    record.TOP_K: "top_k",
    record.STATUS: "status",
}

# A record read with HGETALL is its flat field/value list ``flat`` (what the claim answers)
# and ``at``, field -> position of its value. ``put`` writes a value there and appends the
# field and value to ``w`` (the HSET to make), a long value in pieces as contract.record does.
_RECORD = """
local REQUIRED = {$required}
local FINAL = $final
local function positions(flat)
  local at = {}
  for j = 1, #flat, 2 do at[flat[j]] = j + 1 end
  return at
end
local function put(flat, at, w, f, value)
  if #value > $piece then
    for n = 0, math.ceil(#value / $piece) - 1 do
      local piece = string.sub(value, n * $piece + 1, (n + 1) * $piece)
      put(flat, at, w, n == 0 and f or (f .. n), piece)
    end
    return
  end
  local j = at[f]
  if j then flat[j] = value else
    flat[#flat + 1] = f; flat[#flat + 1] = value; at[f] = #flat
  end
  w[#w + 1] = f; w[#w + 1] = value
end
local function since(flat, at, now)
  local t = at['t'] and tonumber(flat[at['t']]) or 0
  return string.format('%d', now - t)
end

-- Ends the job at ``key`` with ``status`` (a code; ``name`` for its event) and ``err``
-- ("<type>:<message>", or nil), keeps it for its TTL from now, and adds its event.
local function finish(key, flat, at, status, name, err, now, events, maxlen)
  local w = {}
  put(flat, at, w, 's', status)
  put(flat, at, w, 'f', since(flat, at, now))
  if err then put(flat, at, w, 'e', err) end
  redis.call('HSET', key, unpack(w))
  redis.call('EXPIRE', key, tonumber(redis.call('HGET', key, 'l')) or $ttl)
  local id = string.sub(key, $id_from)
  redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*', 'id', id, 'status', name, 'batch', '')
  return id
end

-- Fails the job at ``key`` with ``err`` ("<type>:<message>") and adds its event.
local function fail(key, flat, at, err, now, events, maxlen)
  return finish(key, flat, at, $failed, 'failed', err, now, events, maxlen)
end

-- Whether the job's deadline (µs after submission) passed before ``now``.
local function overdue(flat, at, now)
  if not at['d'] then return false end
  return now > (at['t'] and tonumber(flat[at['t']]) or 0) + (tonumber(flat[at['d']]) or 0)
end

-- Why a record that is not final cannot run: the first required field it lacks, or nil.
local function unrunnable(flat, at)
  for _, f in ipairs(REQUIRED) do
    if not at[f[1]] then return f[2] end
  end
  if not tonumber(flat[at['k']]) then return 'top_k' end
  local status = flat[at['s']]
  if status ~= $queued and status ~= $running then return 'status' end
  return nil
end
"""

# KEYS: the jobs' keys, then the model's stats hash and the events stream. ARGV: now (µs),
# worker (catalog ID), max_attempts, mode ("fresh" | "any"), channel, events' max length.
# Answers per job its state; the caller reads the records in the same transaction, after it,
# since passing a whole record through Lua costs more than all the rest of a claim. A record
# without a required field is failed at once, naming the field (and given the empty value, so
# that it reads as a failed job). "fresh" claims only never-started jobs
# and answers "suspect" for the rest, so that a job which may have killed a worker is retried
# on its own rather than beside its neighbours. A job whose deadline passed ends expired,
# unrun, whether it was never started or is retried after its worker died.
_CLAIM = _lua(
    _RECORD
    + """
local n = #KEYS - 2
local stats, events, maxlen = KEYS[n + 1], KEYS[n + 2], ARGV[6]
local now, max_attempts, fresh = tonumber(ARGV[1]), tonumber(ARGV[3]), ARGV[4] == 'fresh'
local out, failed, expired = {}, {}, {}
local FIELDS = {'s', 'a', 't', 'u', 'm', 'k', 'd'}
for i = 1, n do
  local key = KEYS[i]
  local v = redis.pcall('HMGET', key, unpack(FIELDS))
  local attempts = not v.err and (tonumber(v[2]) or 0)
  if v.err then
    if not string.find(tostring(v.err), 'WRONGTYPE') then return v end
    out[i] = 'corrupt'
  elseif not v[1] and redis.call('EXISTS', key) == 0 then
    out[i] = 'missing'
  elseif (v[1] == $queued or v[1] == $running) and v[4] and v[5] and tonumber(v[6])
      and attempts < max_attempts and not (fresh and attempts > 0)
      and (not v[7] or now <= (tonumber(v[3]) or 0) + (tonumber(v[7]) or 0)) then
    -- The common case, without the tables below: a runnable job claimed.
    redis.call('HSET', key, 's', $running, 'a', attempts + 1,
      'b', string.format('%d', now - (tonumber(v[3]) or 0)), 'w', ARGV[2])
    out[i] = 'claimed'
  else
    local flat = {}
    for j, f in ipairs(FIELDS) do
      if v[j] then flat[#flat + 1] = f; flat[#flat + 1] = v[j] end
    end
    local at = positions(flat)
    local status = at['s'] and flat[at['s']]
    local attempts = at['a'] and tonumber(flat[at['a']]) or 0
    local missing = nil
    if not FINAL[status] then missing = unrunnable(flat, at) end
    if FINAL[status] then
      out[i] = 'final'
    elseif missing then
      local w = {}
      put(flat, at, w, 'u', at['u'] and flat[at['u']] or '')
      put(flat, at, w, 'm', at['m'] and flat[at['m']] or '')
      put(flat, at, w, 'k', tostring(at['k'] and tonumber(flat[at['k']]) or 0))
      redis.call('HSET', key, unpack(w))
      failed[#failed + 1] = fail(key, flat, at, $invalid .. ':the job record has no valid "' ..
        missing .. '" field, so it cannot be run', now, events, maxlen)
      out[i] = 'final'
    elseif overdue(flat, at, now) then
      expired[#expired + 1] = finish(key, flat, at, $expired, 'expired', nil, now, events, maxlen)
      out[i] = 'expired'
    elseif fresh and attempts > 0 then
      out[i] = 'suspect'
    elseif attempts >= max_attempts then
      failed[#failed + 1] = fail(key, flat, at, $poison .. ':the job was started ' .. attempts ..
        ' times and each time its worker died before finishing it; giving up', now, events, maxlen)
      out[i] = 'poisoned'
    else
      local w = {}
      put(flat, at, w, 's', $running)
      put(flat, at, w, 'a', tostring(attempts + 1))
      put(flat, at, w, 'b', since(flat, at, now))
      put(flat, at, w, 'w', ARGV[2])
      redis.call('HSET', key, unpack(w))
      out[i] = 'claimed'
    end
  end
end
if #failed > 0 then redis.call('HINCRBY', stats, 'failed', #failed) end
if #expired > 0 then redis.call('HINCRBY', stats, 'expired', #expired) end
for _, id in ipairs(expired) do failed[#failed + 1] = id end
if #failed > 0 then redis.call('PUBLISH', ARGV[5], cjson.encode(failed)) end
return out
"""
)

# KEYS: the jobs' keys, the events stream, then the stats hashes. ARGV: the events' max length,
# the number of jobs; then per job: its stats hash (1 = the first), its status (the counter and
# event name), its attempts, its TTL once final, the number of field values to write, those
# field values. Writes only over a job that is not final yet: a result is stored once (and a
# cancelled job's is discarded). If a later delivery started the job again meanwhile, the stored
# record keeps that higher attempt count. Answers per job 1 written, 0 final already (counted
# as a duplicate, or as discarded where the job was cancelled), -1 no record.
_FINISH = _lua("""
local FINAL = $final
local maxlen, n = ARGV[1], tonumber(ARGV[2])
local events = KEYS[n + 1]
local counts, out, at = {}, {}, 3
for i = 1, n do
  local key, stats = KEYS[i], KEYS[n + 1 + tonumber(ARGV[at])]
  local status, attempts, ttl = ARGV[at + 1], tonumber(ARGV[at + 2]), ARGV[at + 3]
  local count = tonumber(ARGV[at + 4])
  local first = at + 5
  at = first + count
  local cur = redis.pcall('HMGET', key, 's', 'a')
  local counter = nil
  if cur.err then
    if not string.find(tostring(cur.err), 'WRONGTYPE') then return cur end
    out[i] = -1
  elseif not cur[1] and redis.call('EXISTS', key) == 0 then
    out[i] = -1
  elseif FINAL[cur[1]] then
    out[i], counter = 0, cur[1] == $cancelled and 'discarded' or 'duplicate'
  else
    redis.call('HSET', key, unpack(ARGV, first, at - 1))
    redis.call('EXPIRE', key, ttl)
    if attempts > (tonumber(cur[2]) or 0) then redis.call('HSET', key, 'a', attempts) end
    redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*',
      'id', string.sub(key, $id_from), 'status', status, 'batch', '')
    out[i], counter = 1, status
  end
  if counter then
    counts[stats] = counts[stats] or {}
    counts[stats][counter] = (counts[stats][counter] or 0) + 1
  end
end
for stats, by_name in pairs(counts) do
  for name, count in pairs(by_name) do redis.call('HINCRBY', stats, name, count) end
end
return out
""")

# KEYS: the jobs' keys. ARGV per job: its TTL in seconds, the number of field values, those
# field values. Creates only records that do not exist; answers 1 created, 0 existed.
_CREATE = """
local out, at = {}, 1
for i, key in ipairs(KEYS) do
  local ttl, count = ARGV[at], tonumber(ARGV[at + 1])
  if redis.call('EXISTS', key) == 0 then
    redis.call('HSET', key, unpack(ARGV, at + 2, at + 1 + count))
    redis.call('EXPIRE', key, ttl)
    out[i] = 1
  else
    out[i] = 0
  end
  at = at + 2 + count
end
return out
"""

# KEYS: the jobs' keys, then the events stream. ARGV: now (µs), the events' max length, the
# stats keys' prefix (the model name follows), the finished-jobs channel. Ends each queued or
# running job cancelled: a later claim sees it final and skips it, a later result is discarded.
# Counts it in its model's stats, adds its event, keeps it for its TTL from now, and announces
# the cancelled IDs. Answers per job a CancelOutcome.
_CANCEL = _lua("""
local FINAL = $final
local n = #KEYS - 1
local events, now, maxlen, prefix = KEYS[n + 1], tonumber(ARGV[1]), ARGV[2], ARGV[3]
local out, ended = {}, {}
for i = 1, n do
  local key = KEYS[i]
  local v = redis.pcall('HMGET', key, 's', 't', 'l', 'm', 'm1')
  if v.err then
    if not string.find(tostring(v.err), 'WRONGTYPE') then return v end
    out[i] = 'corrupt'
  elseif not v[1] then
    out[i] = redis.call('EXISTS', key) == 0 and 'missing' or 'corrupt'
  elseif FINAL[v[1]] then
    out[i] = 'final'
  elseif v[1] ~= $queued and v[1] ~= $running then
    out[i] = 'corrupt'
  else
    redis.call('HSET', key, 's', $cancelled,
      'f', string.format('%d', now - (tonumber(v[2]) or 0)))
    redis.call('EXPIRE', key, tonumber(v[3]) or $ttl)
    local id = string.sub(key, $id_from)
    redis.call('XADD', events, 'MAXLEN', '~', maxlen, '*',
      'id', id, 'status', 'cancelled', 'batch', '')
    redis.call('HINCRBY', prefix .. (v[4] or '') .. (v[5] or ''), 'cancelled', 1)
    ended[#ended + 1] = id
    out[i] = v[1] == $queued and 'cancelled' or 'cancelled_running'
  end
end
if #ended > 0 then redis.call('PUBLISH', ARGV[4], cjson.encode(ended)) end
return out
""")


@dataclass(frozen=True)
class Claim:
    """What claiming one job found; ``job`` is None when the state is MISSING or CORRUPT."""

    job_id: str
    state: ClaimState
    job: Job | None


class JobStore:
    """Reads and writes job records. Takes its Redis client from the caller.

    Every method is one round trip for many jobs (plus, now and then, one to read or write the
    names and labels records refer to, see ``contract.record.Catalog``).
    """

    def __init__(self, client: redis.Redis, ttl_s: int = defaults.QUEUED_TTL_S) -> None:
        """``ttl_s``: how long a new record lives at least while queued or running; each job's
        own ``ttl_s`` takes over once it is final."""
        self.redis = client
        self.ttl_s = ttl_s
        self._claim = client.register_script(_CLAIM)
        self._finish = client.register_script(_FINISH)
        self._create = client.register_script(_CREATE)
        self._cancel = client.register_script(_CANCEL)
        self._catalog = record.Catalog()
        self._catalog_since = time.monotonic()

    def create_many(self, jobs: Sequence[Job]) -> list[bool]:
        """Store new records; a job whose ID already exists is left as it is (False)."""
        if not jobs:
            return []
        self._maybe_rewrite_catalog()
        calls = [
            ([keys.job_key(j.id) for j in chunk], _create_args(chunk, self.ttl_s, self._catalog))
            for chunk in _chunks(jobs, CREATE_CHUNK)
        ]

        def fill(pipe: Pipeline) -> None:
            for names, args in calls:
                _call(pipe, self._create, names, args)

        replies = self._round_trip(fill)
        _raise_first_error(replies)
        return [bool(created) for created in itertools.chain.from_iterable(replies)]

    def get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        if not job_ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(keys.job_key(job_id))
        stored = [
            _stored(i, r) for i, r in zip(job_ids, pipe.execute(raise_on_error=False), strict=True)
        ]
        self._learn([r for r in stored if r is not None])
        return [None if r is None else record.from_fields(r, self._catalog) for r in stored]

    def get(self, job_id: str) -> Job | None:
        return self.get_many([job_id])[0]

    def settled(self, job_ids: Sequence[str]) -> list[bool]:
        """Whether each job may be final: its status code says so, or it has none to read (no
        record, or not a hash). Reads one field, so that a waiter reads a record in full once."""
        if not job_ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(keys.job_key(job_id), record.STATUS)
        return [_settled(r) for r in pipe.execute(raise_on_error=False)]

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
        if not job_ids:
            return []
        self._maybe_rewrite_catalog()
        worker_id = self._catalog.name(record.claimed_by(worker))
        args = [
            record.micros(now),
            worker_id,
            max_attempts,
            "fresh" if fresh_only else "any",
            keys.finished_channel(),
            defaults.EVENTS_MAX_LEN,
        ]
        names = [*map(keys.job_key, job_ids), keys.stats_key(model), keys.events_stream()]

        def fill(pipe: Pipeline) -> None:
            _call(pipe, self._claim, names, args)
            for name in names[: len(job_ids)]:
                pipe.hgetall(name)

        states, *records = self._round_trip(fill, transaction=True)
        _raise_first_error([states])
        found = [_claimed(*z) for z in zip(job_ids, states, records, strict=True)]
        self._learn([r for _, r in found if r is not None])
        return [
            self._claim_of(job_id, state, r)
            for job_id, (state, r) in zip(job_ids, found, strict=True)
        ]

    def finish_many(self, jobs: Sequence[Job]) -> list[bool]:
        """Store final records and announce them, in one round trip; True where written."""
        if not jobs:
            return []
        self._maybe_rewrite_catalog()
        stats = list(dict.fromkeys(keys.stats_key(j.model) for j in jobs))
        args: list[str | int | bytes] = [defaults.EVENTS_MAX_LEN, len(jobs)]
        for job in jobs:
            base = 0 if job.submitted is None else record.micros(job.submitted)
            fields = record.result_fields(job, base, self._catalog)
            args += [stats.index(keys.stats_key(job.model)) + 1, str(job.status), job.attempts]
            args.append(job.ttl_s)
            args += [2 * len(fields), *itertools.chain.from_iterable(fields.items())]
        names = [*(keys.job_key(j.id) for j in jobs), keys.events_stream(), *stats]

        def fill(pipe: Pipeline) -> None:
            _call(pipe, self._finish, names, args)
            pipe.publish(keys.finished_channel(), json.dumps([j.id for j in jobs]))

        replies = self._round_trip(fill)
        _raise_first_error(replies)
        return [r == 1 for r in replies[-2]]

    def cancel_many(self, job_ids: Sequence[str], now: float) -> list[CancelOutcome]:
        """End every queued or running job of ``job_ids`` cancelled, in one round trip; final,
        missing and corrupt records are left as they are. Answers per job in input order."""
        if not job_ids:
            return []
        names = [*map(keys.job_key, job_ids), keys.events_stream()]
        args = [
            record.micros(now),
            defaults.EVENTS_MAX_LEN,
            keys.stats_key(""),
            keys.finished_channel(),
        ]
        replies = self._round_trip(lambda pipe: _call(pipe, self._cancel, names, args))
        _raise_first_error(replies)
        return [CancelOutcome(keys.text(r)) for r in replies[0]]

    def stats(self, model: str) -> dict[str, int]:
        return read_stats(self.redis, model)

    def _pipeline(self, transaction: bool = False) -> tuple[Pipeline, _Pending]:
        """A pipeline that first writes the names and labels the records refer to, if new."""
        pipe = self.redis.pipeline(transaction=transaction)
        names, labels = pending = self._catalog.take_pending()
        if names:
            pipe.hset(keys.names_key(), items=list(itertools.chain.from_iterable(names.items())))
        for (model, answerer), by_index in labels.items():
            pairs: list[int | str] = [x for item in by_index.items() for x in item]
            pipe.hset(keys.labels_key(model, answerer), items=pairs)
        return pipe, pending

    def _round_trip(self, fill: Callable[[Pipeline], None], transaction: bool = False) -> list[Any]:
        """The replies (errors among them) of the commands ``fill`` adds to a pipeline after the
        catalog's. Scripts go by SHA alone, without redis-py's SCRIPT EXISTS round trip before
        each pipeline (about 3 µs of Redis CPU a job): a Redis that does not know them (new, or
        restarted) gets them loaded, and the commands run once more."""
        for _ in range(2):
            pipe, pending = self._pipeline(transaction)
            fill(pipe)
            replies = self._execute(pipe, pending)
            if not any(isinstance(r, NoScriptError) for r in replies):
                return replies
            for script in (self._claim, self._finish, self._create, self._cancel):
                self.redis.script_load(script.script)
        return replies

    def _execute(self, pipe: Pipeline, pending: _Pending) -> list[Any]:
        """The replies of the commands after the catalog's (errors among them)."""
        replies = pipe.execute(raise_on_error=False)
        names, labels = pending
        _raise_first_error(replies[: len(labels) + bool(names)])
        self._catalog.written(names, labels)
        return replies[len(labels) + bool(names) :]

    def _maybe_rewrite_catalog(self) -> None:
        if time.monotonic() - self._catalog_since > defaults.CATALOG_REWRITE_S:
            self._catalog.forget_written()
            self._catalog_since = time.monotonic()

    def _learn(self, stored: Sequence[record.Stored]) -> None:
        """Reads the names, then the labels, ``stored`` refers to that this process lacks."""
        if ids := sorted(self._catalog.unknown_names(stored)):
            texts = self.redis.hmget(keys.names_key(), ids)
            names = {i: keys.text(t) for i, t in zip(ids, texts, strict=True) if t is not None}
            self._catalog.learn(names, {})
        if wanted := list(self._catalog.unknown_labels(stored)):
            pipe = self.redis.pipeline(transaction=False)
            for model, answerer in wanted:
                pipe.hgetall(keys.labels_key(model, answerer))
            found = pipe.execute()
            self._catalog.learn(
                {},
                {
                    key: {int(i): keys.text(label) for i, label in by_index.items()}
                    for key, by_index in zip(wanted, found, strict=True)
                },
            )

    def _claim_of(self, job_id: str, state: str, stored: record.Stored | None) -> Claim:
        if stored is None:
            return Claim(job_id, ClaimState(state), None)
        try:
            return Claim(job_id, ClaimState(state), record.from_fields(stored, self._catalog))
        except MalformedRecord:
            return Claim(job_id, CORRUPT, None)


# Names and labels handed to a pipeline, marked written once it ran.
_Pending = tuple[dict[int, str], dict[tuple[str, int], dict[int, str]]]
# Jobs created by one script call: Redis runs nothing else while a script runs.
CREATE_CHUNK = 1000


def read_stats(client: redis.Redis, model: str) -> dict[str, int]:
    """``model``'s counters: jobs done, failed, cancelled, expired; results computed again
    (duplicate) or for a cancelled job (discarded)."""
    raw = client.hgetall(keys.stats_key(model))
    return {keys.text(k): int(v) for k, v in raw.items()}


def _create_args(
    jobs: Sequence[Job], queued_ttl_s: int, catalog: record.Catalog
) -> list[str | int | bytes]:
    """Per job: its TTL while queued (at least ``queued_ttl_s``, at least its own final TTL),
    the number of field values, then those values."""
    args: list[str | int | bytes] = []
    for job in jobs:
        fields = record.to_fields(job, catalog)
        args += [max(queued_ttl_s, job.ttl_s), 2 * len(fields)]
        args += itertools.chain.from_iterable(fields.items())
    return args


def _chunks(jobs: Sequence[Job], size: int) -> list[Sequence[Job]]:
    return [jobs[i : i + size] for i in range(0, len(jobs), size)]


def _stored(job_id: str, reply: dict[bytes, bytes] | Exception) -> record.Stored | None:
    """A record read with HGETALL; None when there is none. Only WRONGTYPE says something about
    the record; any other error (a lost connection, say) says the read did not happen."""
    if isinstance(reply, Exception):
        if str(reply).startswith("WRONGTYPE"):
            raise MalformedRecord(f"job record {job_id!r} is not a hash") from reply
        raise reply
    return record.stored(job_id, reply) if reply else None


def _settled(reply: bytes | Exception | None) -> bool:
    if isinstance(reply, Exception) and not str(reply).startswith("WRONGTYPE"):
        raise reply
    return not isinstance(reply, bytes) or reply in _FINAL_CODES


_FINAL_CODES = {record.STATUS_CODES[status].encode() for status in FINAL}


def _claimed(
    job_id: str, state: bytes | str, fields: dict[bytes, bytes] | Exception
) -> tuple[str, record.Stored | None]:
    """The claim script's answer for a job and its record, read right after in the same
    transaction (an error there where the record is not a hash)."""
    text = keys.text(state)
    if text in (MISSING, CORRUPT):
        return text, None
    _raise_first_error([fields])
    assert isinstance(fields, dict)
    return text, record.stored(job_id, fields)


def _call(pipe: Pipeline, script: Script, names: Sequence[str], args: Sequence[Any]) -> None:
    pipe.evalsha(script.sha, len(names), *names, *args)


def _raise_first_error(replies: Sequence[Any]) -> None:
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
