"""Job records in Redis: create, read, claim and finish, each a single round trip for many jobs.

A record is one packed string (``contract.record``): created with ``SET NX EX``, read with
``MGET``. Claims and results run as Lua scripts, one call per batch, so that a redelivered
message can never move a finished job backwards or write its result twice: a claim rewrites the
record's fixed-width header in place, a result replaces the record unless it is final already.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from string import Template
from typing import Any, cast

import redis
from redis.client import Pipeline
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from contract import defaults, keys, record
from contract.batch import BATCH_FINISHED, BatchSpec
from contract.errors import MalformedRecord, PoisonJob
from contract.job import CANCELLED, EXPIRED, FAILED, FINAL, QUEUED, RUNNING, Job, JobStatus

log = logging.getLogger(__name__)


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
# The claim script's answer: one letter per job.
_CLAIM_STATES = {
    "c": CLAIMED,
    "s": SUSPECT,
    "f": ALREADY_FINAL,
    "p": POISONED,
    "e": EXPIRED_CLAIM,
    "m": MISSING,
    "x": CORRUPT,
}


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
    """``script`` with the record's layout (``contract.record``) and error types filled in.

    ``$format`` is the format byte, ``$head`` the header's length, ``$running`` and ``$failed``
    status codes, ``$names`` a table of every status code's name, ``$final`` one of the final
    codes, ``$runnable`` one of the codes a claim may start, ``$error`` the error field's tag,
    ``$model`` the model field's tag, ``$cancelled``, ``$expired`` status codes, ``$ttl`` a final
    record's TTL when it names none, ``$poison`` an error type, ``$id_from`` where the ID starts
    in a key, ``$batch`` the batch field's tag, ``$batch_prefix`` a batch's key without its ID,
    ``$batch_finished`` a batch's finish event's status; ``$status_at``,
    ``$attempts_at``, ``$finished_at`` and ``$time_bytes`` the header's layout.
    """
    code = record.STATUS_CODES

    def table(statuses: Sequence[JobStatus]) -> str:
        return "{" + ", ".join(f"{_code(s)} = '{s}'" for s in statuses) + "}"

    return Template(script).substitute(
        format=f"string.char({record.FORMAT[0]})",
        head=record.HEADER_BYTES,
        running=f"'{code[RUNNING].decode()}'",
        failed=f"'{code[FAILED].decode()}'",
        cancelled=f"'{code[CANCELLED].decode()}'",
        expired=f"'{code[EXPIRED].decode()}'",
        ttl=defaults.JOB_TTL_S,
        names=table(list(code)),
        final=table([s for s in code if s in FINAL]),
        runnable=table([QUEUED, RUNNING]),
        error=f"string.char({record.ERROR})",
        model=f"string.char({record.MODEL})",
        batch=f"string.char({record.BATCH})",
        batch_prefix=f"'{keys.batch_key('')}'",
        batch_finished=f"'{BATCH_FINISHED}'",
        poison=f"'{PoisonJob.type}'",
        id_from=len(keys.job_key("")) + 1,
        status_at=record.STATUS_AT,
        attempts_at=record.ATTEMPTS_AT,
        finished_at=record.FINISHED_AT,
        time_bytes=record.TIME_BYTES,
    )


def _code(status: JobStatus) -> str:
    return f"['{record.STATUS_CODES[status].decode()}']"


# A record is a string: a fixed-width header, then tagged fields (contract.record). The
# header's offsets are 0-based as SETRANGE takes them (``STATUS_AT``, ``ATTEMPTS_AT``: strings,
# as Lua formats a number it hands Redis with snprintf), 1-based as Lua reads them (``STATUS``,
# ``ATTEMPTS``, ``FINISHED``: numbers, as arithmetic on a string parses it each time). The hot
# paths call few Lua functions of their own: each call costs Redis hundreds of instructions.
# ``is_record`` tells a record of this format from anything else a key may hold.
_RECORD = """
local FORMAT, HEAD, NAMES, FINAL, RUNNABLE = $format, $head, $names, $final, $runnable
local STATUS_AT, ATTEMPTS_AT = '$status_at', '$attempts_at'
local STATUS, ATTEMPTS, FINISHED = $status_at + 1, $attempts_at + 1, $finished_at + 1
local function is_record(v)
  return string.sub(v, 1, 1) == FORMAT and #v >= HEAD
end
local function attempts(v)
  local a, b = string.byte(v, ATTEMPTS, ATTEMPTS + 1)
  return a + 256 * b
end
-- Little-endian unsigned integers: ``n`` in ``width`` bytes, in two.
local function le(n, width)
  local out = {}
  for i = 1, width do
    out[i] = n % 256
    n = math.floor(n / 256)
  end
  return string.char(unpack(out))
end
local function le16(n)
  return string.char(n % 256, math.floor(n / 256))
end
-- The time (µs) ``le(n, $time_bytes)`` wrote at 1-based position ``at`` of ``v``.
local function time_at(v, at)
  local n = 0
  for j = $time_bytes - 1, 0, -1 do n = n * 256 + string.byte(v, at + j) end
  return n
end
-- A tagged field: its tag, its length (LEB128), its value.
local function field(tag, value)
  local n, size = #value, ''
  while n >= 128 do
    size = size .. string.char(128 + n % 128)
    n = math.floor(n / 128)
  end
  return tag .. size .. string.char(n) .. value
end
-- Completion events, gathered over one call: a stream entry per status and batch, with its job
-- IDs space-separated (``ids``), written in the order each first came by ``flush_events`` at
-- the call's end (an XADD a job cost Redis more than its record). The stream is then trimmed
-- once, to as many entries as make about ``max_bytes`` at the size of this call's entries.
-- ``gathered``: batch -> status -> its entry (no string built a job to find it).
local gathered, order = {}, {}
local function event(id, status, batch)
  local by_status = gathered[batch]
  if not by_status then
    by_status = {}
    gathered[batch] = by_status
  end
  local g = by_status[status]
  if not g then
    g = {status = status, batch = batch}
    by_status[status], order[#order + 1] = g, g
  end
  g[#g + 1] = id
end
-- The last entry's XADD trims too (the entries' sizes are known before the first is added).
local function flush_events(events, max_bytes)
  if #order == 0 then return end
  local bytes, texts = 0, {}
  for i, g in ipairs(order) do
    texts[i] = table.concat(g, ' ')
    bytes = bytes + #texts[i] + #g.status + #g.batch + 32  -- 32: an entry's own bytes, about
  end
  local keep = math.max(1, math.floor(tonumber(max_bytes) * #order / bytes))
  for i, g in ipairs(order) do
    if i < #order then
      redis.call('XADD', events, '*', 'ids', texts[i], 'status', g.status, 'batch', g.batch)
    else
      redis.call('XADD', events, 'MAXLEN', '~', keep, '*',
        'ids', texts[i], 'status', g.status, 'batch', g.batch)
    end
  end
  gathered, order = {}, {}
end
-- Finishes ``batch`` (its hash ``bkey``, ``final`` of its jobs final) once as many of its jobs
-- are final as were submitted, unless a submission still holds it (``:holds``): sets
-- ``finished`` to ``stamp`` (µs), drops its job list (only jobs not final yet are ever
-- cancelled) and, with ``announce``, adds its own event. Its keys live as long as its records:
-- at least as long as the queued ones, and once it is finished its ``ttl`` (its longest final
-- TTL) from then. True when this call finished it.
local function settle_batch(batch, bkey, final, stamp, announce)
  local v = redis.call('HMGET', bkey, 'total', 'ttl')
  local total, ttl = tonumber(v[1]), tonumber(v[2])
  local finished = total ~= nil and total > 0 and final >= total
    and redis.call('EXISTS', bkey .. ':holds') == 0
    and redis.call('HSETNX', bkey, 'finished', stamp) == 1
  if finished then
    redis.call('DEL', bkey .. ':jobs')
    if announce then event('', $batch_finished, batch) end
  elseif ttl then
    ttl = math.max(ttl, redis.call('TTL', bkey))
  end
  if ttl then
    for _, k in ipairs({bkey, bkey .. ':jobs', bkey .. ':results'}) do
      redis.call('EXPIRE', k, ttl)
    end
  end
  return finished
end
-- Counts jobs of ``batch`` that just became final: ``names`` status -> count, ``ids`` their IDs
-- (appended to the batch's results list); then finishes the batch if that was the last of them.
local function batch_final(batch, names, ids, now)
  local bkey = $batch_prefix .. batch
  for name, count in pairs(names) do redis.call('HINCRBY', bkey, name, count) end
  local final = redis.call('HINCRBY', bkey, 'final', #ids)
  redis.call('RPUSH', bkey .. ':results', unpack(ids))
  settle_batch(batch, bkey, final, string.format('%d', now), true)
end
-- The optional fixed-width fields the header's flags announce: a deadline (µs) or nil, the
-- seconds a final record is kept, and where the tagged fields start.
local function optional(v)
  local flags, at, deadline, ttl = string.byte(v, HEAD), HEAD + 1, nil, $ttl
  if flags % 2 == 1 then
    deadline, at = time_at(v, at), at + $time_bytes
  end
  if math.floor(flags / 2) % 2 == 1 then
    local a, b, c, d = string.byte(v, at, at + 3)
    ttl, at = a + 256 * (b + 256 * (c + 256 * d)), at + 4
  end
  return deadline, ttl, at
end
-- Whether the record's deadline passed before ``now`` (µs).
local function overdue(v, now)
  local deadline = optional(v)
  return deadline ~= nil and now > deadline
end
-- The value of the tagged field ``tag`` ('' when the record has none).
local function tagged(v, tag)
  local _, _, at = optional(v)
  while at <= #v do
    local t, n, shift = string.sub(v, at, at), 0, 1
    at = at + 1
    repeat
      local b = string.byte(v, at)
      at, n, shift = at + 1, n + (b % 128) * shift, shift * 128
    until b < 128
    if t == tag then return string.sub(v, at, at + n - 1) end
    at = at + n
  end
  return ''
end
-- Ends the job at ``key`` (its record ``v``) with status ``code`` at ``now`` (µs), appends
-- ``err`` ("<type>:<message>") if given, keeps it for its TTL from now, gathers its event.
local function end_as(key, v, code, err, now)
  local kept = string.sub(v, ATTEMPTS, FINISHED - 1)  -- attempts, started, who
  redis.call('SETRANGE', key, STATUS_AT, code .. kept .. le(now, $time_bytes))
  if err then redis.call('APPEND', key, field($error, err)) end
  local _, ttl = optional(v)
  redis.call('EXPIRE', key, ttl)
  local id, batch = string.sub(key, $id_from), tagged(v, $batch)
  event(id, NAMES[code], batch)
  if batch ~= '' then batch_final(batch, {[NAMES[code]] = 1}, {id}, now) end
  return id
end
"""

# KEYS: the jobs' keys, then the model's stats hash and the events stream. ARGV: now (µs),
# worker (catalog ID), max_attempts, mode ("fresh" | "any"), channel, events' bytes to keep.
# Answers one letter per job, its state (``_CLAIM_STATES``); the caller reads the records in the
# same transaction, after it: a record passed through Lua costs more than the rest of a claim.
# Only the header is read and rewritten, in place. "fresh" claims only never-started jobs and
# answers "suspect" for the rest, so that a job which may have killed a worker is retried on its
# own rather than beside its neighbours. A job started too often is failed (its error appended).
_CLAIM = _lua(
    _RECORD
    + """
local n = #KEYS - 2
local stats, events, max_bytes = KEYS[n + 1], KEYS[n + 2], ARGV[6]
local now, max_attempts, fresh = tonumber(ARGV[1]), tonumber(ARGV[3]), ARGV[4] == 'fresh'
local started = le(now, $time_bytes) .. le(tonumber(ARGV[2]), 4)  -- started, who: every job's
local out, failed, expired = {}, {}, {}

local function poison(key, head, attempts)
  local err = $poison .. ':the job was started ' .. attempts ..
    ' times and each time its worker died before finishing it; giving up'
  failed[#failed + 1] = end_as(key, head, $failed, err, now)
end

local values = redis.call('MGET', unpack(KEYS, 1, math.min(n, 1000)))
for from = 1001, n, 1000 do  -- unpack takes a few thousand values at most
  local part = redis.call('MGET', unpack(KEYS, from, math.min(n, from + 999)))
  for j = 1, #part do values[from + j - 1] = part[j] end
end
-- What a first claim writes over the header, the same for every job of the call.
local first = $running .. le16(1) .. started
for i = 1, n do
  local key, head = KEYS[i], values[i]
  local state = 'x'
  if not head then
    if redis.call('EXISTS', key) == 0 then state = 'm' end
  elseif is_record(head) then
    local code, started_before = string.sub(head, STATUS, STATUS), attempts(head)
    if FINAL[code] then
      state = 'f'
    elseif not RUNNABLE[code] then
      state = 'x'
    elseif string.byte(head, HEAD) % 2 == 1 and overdue(head, now) then  -- 1: a deadline
      expired[#expired + 1] = end_as(key, head, $expired, nil, now)
      state = 'e'
    elseif started_before == 0 and max_attempts > 0 then
      redis.call('SETRANGE', key, STATUS_AT, first)
      state = 'c'
    elseif fresh then
      state = 's'
    elseif started_before >= max_attempts then
      poison(key, head, started_before)
      state = 'p'
    else
      redis.call('SETRANGE', key, STATUS_AT, $running .. le16(started_before + 1) .. started)
      state = 'c'
    end
  end
  out[i] = state
end
if #failed > 0 then redis.call('HINCRBY', stats, 'failed', #failed) end
if #expired > 0 then redis.call('HINCRBY', stats, 'expired', #expired) end
for _, id in ipairs(expired) do failed[#failed + 1] = id end
flush_events(events, max_bytes)
if #failed > 0 then redis.call('PUBLISH', ARGV[5], cjson.encode(failed)) end
return table.concat(out)
"""
)

# KEYS: the jobs' keys, the events stream, then the stats hashes. ARGV: the events' bytes to keep,
# the number of jobs, the finished-jobs channel; then per job: its stats hash (1 = the first),
# its TTL once final, and its final record. Every job's ID is announced on the channel, written
# or not. Writes only over a job that is not final yet: a result is stored once (and a cancelled
# job's is discarded, counted as such). The write comes first, with its TTL (SET ... EX GET,
# one command where a read, a write and an EXPIRE would be three), and is undone where the
# record was final already (put back with the expiry it had: ``put_back``), or not a record.
# What a job key holds that is not a record is put back too, with the result's TTL from now:
# its own expiry is unknown without one command more per result, and a job key is this
# service's, so that whatever else lies there goes when a record would, never stays for good.
# If a later delivery started the job again meanwhile, the stored record keeps that higher
# attempt count. Answers per job 1 written, 0 final already (a
# duplicate), -1 no record. After the jobs: now (µs), then each job's batch ('' for none): a
# job of a batch is counted in it (``batch_final``) and its event names it.
_FINISH = _lua(
    _RECORD
    + """
local max_bytes, n = ARGV[1], tonumber(ARGV[2])
local events, now = KEYS[n + 1], tonumber(ARGV[3 * n + 4])
local counts, out, ids, batches = {}, {}, {}, {}
-- Puts the final record ``old`` back at ``key`` with the expiry it had: its TTL from when it
-- ended, both read from its header (``end_as`` and a stored result set that expiry at its end
-- time, give or take the moment between a result and its store, and clock skew). Never later
-- than its TTL from now (a clock ahead, or no end time), never sooner than a second from now
-- (a PXAT in the past would delete it).
local function put_back(key, old)
  local finished = time_at(old, FINISHED)
  local _, ttl = optional(old)
  local t = redis.call('TIME')
  local now_ms = t[1] * 1000 + math.floor(t[2] / 1000)
  local at = math.min(math.floor(finished / 1000) + ttl * 1000, now_ms + ttl * 1000)
  redis.call('SET', key, old, 'PXAT', string.format('%d', math.max(at, now_ms + 1000)))
end
for i = 1, n do
  local key, ttl, value = KEYS[i], ARGV[3 * i + 2], ARGV[3 * i + 3]
  local stats = KEYS[n + 1 + tonumber(ARGV[3 * i + 1])]
  ids[i] = string.sub(key, $id_from)
  local old = redis.pcall('SET', key, value, 'XX', 'EX', ttl, 'GET')
  local counter = nil
  if type(old) == 'table' then
    if not string.find(tostring(old.err), 'WRONGTYPE') then
      flush_events(events, max_bytes)  -- the results written before it are announced
      return old
    end
    out[i] = -1
  elseif not old then
    out[i] = -1
  elseif not is_record(old) then
    redis.call('SET', key, old, 'KEEPTTL')  -- with the result's TTL: see above
    out[i] = -1
  elseif FINAL[string.sub(old, STATUS, STATUS)] then
    put_back(key, old)
    out[i] = 0
    counter = string.sub(old, STATUS, STATUS) == $cancelled and 'discarded' or 'duplicate'
  else
    local was = attempts(old)
    if was > attempts(value) then
      redis.call('SETRANGE', key, ATTEMPTS_AT, le16(was))
    end
    counter = NAMES[string.sub(value, STATUS, STATUS)]
    local batch = ARGV[3 * n + 4 + i]
    event(ids[i], counter, batch)
    if batch ~= '' then
      local b = batches[batch] or {names = {}, ids = {}}
      batches[batch] = b
      b.names[counter] = (b.names[counter] or 0) + 1
      b.ids[#b.ids + 1] = ids[i]
    end
    out[i] = 1
  end
  if counter then
    counts[stats] = counts[stats] or {}
    counts[stats][counter] = (counts[stats][counter] or 0) + 1
  end
end
for stats, by_name in pairs(counts) do
  for name, count in pairs(by_name) do redis.call('HINCRBY', stats, name, count) end
end
for batch, b in pairs(batches) do batch_final(batch, b.names, b.ids, now) end
flush_events(events, max_bytes)
redis.call('PUBLISH', ARGV[3], cjson.encode(ids))
return out
"""
)


# KEYS: the jobs' keys, then the events stream. ARGV: now (µs), the events' bytes to keep, the
# stats keys' prefix (the model name follows), the finished-jobs channel. Ends each queued or
# running job cancelled: a later claim sees it final and skips it, a later result is discarded.
# Counts it in its model's stats and its batch, adds its event, keeps it for its TTL from now,
# and announces the cancelled IDs. Answers per job a CancelOutcome.
_CANCEL = _lua(
    _RECORD
    + """
local n = #KEYS - 1
local events, now, max_bytes, prefix = KEYS[n + 1], tonumber(ARGV[1]), ARGV[2], ARGV[3]
local out, ended = {}, {}
for i = 1, n do
  local key = KEYS[i]
  local v = redis.pcall('GET', key)
  if type(v) == 'table' then
    if not string.find(tostring(v.err), 'WRONGTYPE') then
      flush_events(events, max_bytes)  -- the jobs cancelled before it are announced
      return v
    end
    out[i] = 'corrupt'
  elseif not v then
    out[i] = 'missing'
  elseif not is_record(v) or not (FINAL[string.sub(v, STATUS, STATUS)]
      or RUNNABLE[string.sub(v, STATUS, STATUS)]) then
    out[i] = 'corrupt'
  elseif FINAL[string.sub(v, STATUS, STATUS)] then
    out[i] = 'final'
  else
    ended[#ended + 1] = end_as(key, v, $cancelled, nil, now)
    redis.call('HINCRBY', prefix .. tagged(v, $model), 'cancelled', 1)
    out[i] = string.sub(v, STATUS, STATUS) == $running and 'cancelled_running' or 'cancelled'
  end
end
flush_events(events, max_bytes)
if #ended > 0 then redis.call('PUBLISH', ARGV[4], cjson.encode(ended)) end
return out
"""
)


# KEYS: the batch's hash, the events stream. ARGV: the batch ID, now (µs), the events' bytes to
# keep, a mode and its argument. "all" drops every hold on the batch (it is closed), "one" the
# hold ARGV[5] (its submission ended); then the batch finishes now if every job of it is final and
# no hold remains (else the finish of its last job will). "settle" only does the latter. "restore"
# (ARGV[5] its old ``finished``) is for a finished batch that a submission of only existing IDs
# joined and left again: finished as before (its old stamp, its keys kept for its ``ttl`` from
# now, as at any finish), without a second event, if nothing else joined meanwhile. Answers 1 when
# it finished the batch, 0 when not (jobs pending, held, or finished before), -1 when there is no
# batch.
_CLOSE_BATCH = _lua(
    _RECORD
    + """
local bkey, batch, now, mode = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[4]
if redis.call('EXISTS', bkey) == 0 then return -1 end
if mode == 'all' then
  redis.call('DEL', bkey .. ':holds')
elseif mode == 'one' then
  redis.call('SREM', bkey .. ':holds', ARGV[5])
end
if redis.call('HEXISTS', bkey, 'finished') == 1 then return 0 end
local final = tonumber(redis.call('HGET', bkey, 'final')) or 0
local finished
if mode == 'restore' then
  finished = settle_batch(batch, bkey, final, ARGV[5], false)
else
  finished = settle_batch(batch, bkey, final, string.format('%d', now), true)
end
flush_events(KEYS[2], ARGV[3])
return finished and 1 or 0
"""
)


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
        if ttl_s < 1:
            raise ValueError(f"a job record's TTL must be at least 1 second, not {ttl_s}")
        self.redis = client
        self.ttl_s = ttl_s
        self._claim = client.register_script(_CLAIM)
        self._finish = client.register_script(_FINISH)
        self._cancel = client.register_script(_CANCEL)
        self._close_batch = client.register_script(_CLOSE_BATCH)
        self._catalog = record.Catalog()
        self._catalog_since = time.monotonic()

    def create_many(self, jobs: Sequence[Job], batch: BatchSpec | None = None) -> list[bool]:
        """Store new records; a job whose ID already exists is left as it is (False). All or
        none are written: the SETs go in one transaction (a Redis out of memory refuses it).

        Jobs that name a batch join it in the same transaction (its job list and total), and
        ``batch`` gives the batch's own fields, kept from its first submission. A job whose ID
        existed is taken out of the batch again right after (the rare resubmission)."""
        if not jobs:
            return []
        self._maybe_rewrite_catalog()
        values = [(keys.job_key(j.id), record.encode(j, self._catalog)) for j in jobs]
        joining = _batch_groups(jobs)

        at: dict[str, int] = {}  # where each batch's join starts among the replies

        def fill(pipe: Pipeline) -> None:
            for (key, value), job in zip(values, jobs, strict=True):
                pipe.set(key, value, nx=True, ex=max(self.ttl_s, job.ttl_s))
            start = len(pipe.command_stack)
            for batch_id, members in joining.items():
                at[batch_id] = len(pipe.command_stack) - start + len(jobs)
                _join_batch(pipe, batch_id, members, batch, self.ttl_s)

        replies = self._round_trip(fill, transaction=True)
        _raise_first_error(replies)
        created = [bool(c) for c in replies[: len(jobs)]]
        left = [j for j, c in zip(jobs, created, strict=True) if not c and j.batch]
        if left:
            before = {batch_id: replies[i] for batch_id, i in at.items()}  # their ``finished``
            self._leave_batches(left, joining, before)
        return created

    def _leave_batches(
        self, jobs: Sequence[Job], joining: dict[str, list[Job]], before: dict[str, Any]
    ) -> None:
        """Take jobs whose IDs existed already out of the batches they were counted in; then
        settle each batch: one whose other jobs all became final meanwhile finishes, and one
        that was finished and that only such jobs joined is finished again as it was."""
        groups = _batch_groups(jobs)
        pipe = self.redis.pipeline(transaction=True)
        for batch_id, members in groups.items():
            pipe.hincrby(keys.batch_key(batch_id), "total", -len(members))
            for job in members:
                pipe.lrem(keys.batch_jobs_key(batch_id), -1, job.id)
        pipe.execute()
        for batch_id, members in groups.items():
            finished = before[batch_id]
            try:
                if finished is not None and len(members) == len(joining[batch_id]):
                    self._settle_batch(batch_id, "restore", keys.text(finished))
                else:
                    self._settle_batch(batch_id, "settle")
            except redis.RedisError as e:  # the jobs are in: they must still be queued
                log.warning("batch %s not settled after a resubmission: %s", batch_id, e)

    def get_many(self, job_ids: Sequence[str]) -> list[Job | None]:
        """The records of ``job_ids``, None where there is none; ``MalformedRecord`` where a
        key holds something else (a record of an older release's format among them)."""
        found = self._read(job_ids)
        self._learn([r for r in found if r is not None])
        return [None if r is None else record.decode(r, self._catalog) for r in found]

    def get(self, job_id: str) -> Job | None:
        return self.get_many([job_id])[0]

    def get_final_many(self, job_ids: Sequence[str]) -> list[Job | Unsettled | None]:
        """Like ``get_many`` where a job is final or has no record; ``UNSETTLED`` for the rest,
        whose records are not decoded."""
        found = self._read(job_ids)
        final = [r for r in found if r is not None and r.status_code() in _FINAL_CODES]
        self._learn(final)
        return [
            None
            if r is None
            else record.decode(r, self._catalog)
            if r.status_code() in _FINAL_CODES
            else UNSETTLED
            for r in found
        ]

    def settled(self, job_ids: Sequence[str]) -> list[bool]:
        """Whether each job may be final: its status code says so, or it has no record to read
        (none, or not a string)."""
        if not job_ids:
            return []
        values = _mget(self.redis, job_ids)
        return [
            v is None or v[record.STATUS_AT : record.STATUS_AT + 1] in _FINAL_CODES for v in values
        ]

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
            defaults.EVENTS_MAX_BYTES,
        ]
        names = [*map(keys.job_key, job_ids), keys.stats_key(model), keys.events_stream()]

        def fill(pipe: Pipeline) -> None:
            _call(pipe, self._claim, names, args)
            pipe.mget(names[: len(job_ids)])

        states, values = self._round_trip(fill, transaction=True)
        _raise_first_error([states, values])
        claimed = [_CLAIM_STATES[s] for s in keys.text(states)]
        found = [_claimed(*z) for z in zip(job_ids, claimed, values, strict=True)]
        self._learn([r for r in found if isinstance(r, record.Stored)])
        return [self._claim_of(*z) for z in zip(job_ids, claimed, found, strict=True)]

    def finish_many(self, jobs: Sequence[Job]) -> list[bool]:
        """Store final records and announce them, in one round trip; True where written."""
        if not jobs:
            return []
        self._maybe_rewrite_catalog()
        stats = list(dict.fromkeys(keys.stats_key(j.model) for j in jobs))
        args: list[str | int | bytes] = [
            defaults.EVENTS_MAX_BYTES,
            len(jobs),
            keys.finished_channel(),
        ]
        for job in jobs:
            stats_at = stats.index(keys.stats_key(job.model)) + 1
            args += [stats_at, job.ttl_s, record.encode(job, self._catalog)]
        args += [record.micros(time.time()), *(j.batch or "" for j in jobs)]
        names = [*(keys.job_key(j.id) for j in jobs), keys.events_stream(), *stats]
        (written,) = self._round_trip(lambda pipe: _call(pipe, self._finish, names, args))
        _raise_first_error([written])
        return [r == 1 for r in written]

    def cancel_many(self, job_ids: Sequence[str], now: float) -> list[CancelOutcome]:
        """End every queued or running job of ``job_ids`` cancelled, in one round trip; final,
        missing and corrupt records are left as they are. Answers per job in input order."""
        if not job_ids:
            return []
        names = [*map(keys.job_key, job_ids), keys.events_stream()]
        args = [
            record.micros(now),
            defaults.EVENTS_MAX_BYTES,
            keys.stats_key(""),
            keys.finished_channel(),
        ]
        replies = self._round_trip(lambda pipe: _call(pipe, self._cancel, names, args))
        _raise_first_error(replies)
        return [CancelOutcome(keys.text(r)) for r in replies[0]]

    def close_batch(self, batch_id: str, hold: str | None = None) -> int:
        """Release ``hold`` on the batch (``BatchSpec.hold``; None: every hold, closing it), and
        finish it now if every job of it on this shard is final and no hold remains: 1 when
        this call finished it, 0 when not, -1 when this shard has no such batch."""
        return self._settle_batch(batch_id, "all" if hold is None else "one", hold or "")

    def _settle_batch(self, batch_id: str, mode: str, argument: str = "") -> int:
        """The close script in ``mode`` ("all", "one", "settle", "restore"; see there)."""
        names = [keys.batch_key(batch_id), keys.events_stream()]
        now = record.micros(time.time())
        args = [batch_id, now, defaults.EVENTS_MAX_BYTES, mode, argument]
        (answer,) = self._round_trip(lambda pipe: _call(pipe, self._close_batch, names, args))
        _raise_first_error([answer])
        return int(answer)

    def stats(self, model: str) -> dict[str, int]:
        return read_stats(self.redis, model)

    def batch_hash(self, batch_id: str) -> dict[str, str]:
        """This shard's hash of the batch (see contract.batch); empty when it has none."""
        raw = self.redis.hgetall(keys.batch_key(batch_id))
        return {keys.text(k): keys.text(v) for k, v in raw.items()}

    def batch_ids(self, batch_id: str, start: int, count: int, *, final: bool) -> list[str]:
        """Up to ``count`` of this shard's job IDs of the batch from position ``start``: in the
        order they became final (``final``), else in submission order."""
        name = keys.batch_results_key if final else keys.batch_jobs_key
        return [keys.text(i) for i in self.redis.lrange(name(batch_id), start, start + count - 1)]

    def _read(self, job_ids: Sequence[str]) -> list[record.Stored | None]:
        """The records of ``job_ids`` by MGET, split into header and fields; None where there
        is none. A key MGET finds no string under is looked at again: a hash is a record of
        the format before this one, anything else not a record; both raise MalformedRecord."""
        if not job_ids:
            return []
        values = _mget(self.redis, job_ids)
        absent = [i for i, v in zip(job_ids, values, strict=True) if v is None]
        if absent:
            _refuse_other_types(self.redis, absent)
        return [
            None if v is None else record.stored(i, v) for i, v in zip(job_ids, values, strict=True)
        ]

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
            for script in (self._claim, self._finish, self._cancel, self._close_batch):
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

    def _claim_of(
        self, job_id: str, state: ClaimState, stored: record.Stored | MalformedRecord | None
    ) -> Claim:
        if not isinstance(stored, record.Stored):
            return Claim(job_id, CORRUPT if stored else state, None)
        try:
            return Claim(job_id, state, record.decode(stored, self._catalog))
        except MalformedRecord:
            return Claim(job_id, CORRUPT, None)


class Unsettled(Enum):
    """``get_final_many``'s answer for a job that is not final yet."""

    UNSETTLED = "unsettled"


UNSETTLED = Unsettled.UNSETTLED

# Names and labels handed to a pipeline, marked written once it ran.
_Pending = tuple[dict[int, str], dict[tuple[str, int], dict[int, str]]]
_FINAL_CODES = frozenset(record.STATUS_CODES[s] for s in FINAL)


def read_stats(client: redis.Redis, model: str) -> dict[str, int]:
    """``model``'s counters: jobs done, failed, cancelled, expired; results computed again
    (duplicate) or for a cancelled job (discarded)."""
    raw = client.hgetall(keys.stats_key(model))
    return {keys.text(k): int(v) for k, v in raw.items()}


def _mget(client: redis.Redis, job_ids: Sequence[str]) -> list[bytes | None]:
    """The values under ``job_ids``' keys, None where a key holds no string."""
    return cast(list[bytes | None], client.mget([keys.job_key(i) for i in job_ids]))


def _refuse_other_types(client: redis.Redis, job_ids: Sequence[str]) -> None:
    """MalformedRecord for the first of ``job_ids`` whose key holds something but a string."""
    pipe = client.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.type(keys.job_key(job_id))
    for job_id, kind in zip(job_ids, pipe.execute(), strict=True):
        kind = keys.text(kind)
        if kind == "hash":
            raise MalformedRecord(
                f"job record {job_id!r} is a hash, the format before packed records (issue 10): "
                "this release cannot read it; let it expire, or read it with the older release"
            )
        if kind != "none":
            raise MalformedRecord(f"job record {job_id!r} is a {kind}, not a job record")


def _claimed(
    job_id: str, state: ClaimState, value: bytes | None
) -> record.Stored | MalformedRecord | None:
    """A claimed job's record, read right after the claim, split; the error where it is none."""
    if value is None or state in (MISSING, CORRUPT):
        return None
    try:
        return record.stored(job_id, value)
    except MalformedRecord as e:
        return e


def _call(pipe: Pipeline, script: Script, names: Sequence[str], args: Sequence[Any]) -> None:
    pipe.evalsha(script.sha, len(names), *names, *args)


def _raise_first_error(replies: Sequence[Any]) -> None:
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply


def _batch_groups(jobs: Sequence[Job]) -> dict[str, list[Job]]:
    """The jobs that name a batch, by batch."""
    groups: dict[str, list[Job]] = {}
    for job in jobs:
        if job.batch is not None:
            groups.setdefault(job.batch, []).append(job)
    return groups


def _join_batch(
    pipe: Pipeline, batch_id: str, jobs: Sequence[Job], spec: BatchSpec | None, queued_ttl_s: int
) -> None:
    """Add ``jobs`` to their batch: its job list, total, first-seen fields, the submission's
    hold and TTLs (as long as its longest-lived new record; its longest final TTL once it is
    finished). The first reply is the batch's ``finished`` before (None when it was not)."""
    name = keys.batch_key(batch_id)
    own = spec if spec is not None and spec.id == batch_id else None  # the submission's batch
    pipe.hget(name, "finished")
    pipe.rpush(keys.batch_jobs_key(batch_id), *(j.id for j in jobs))
    pipe.hincrby(name, "total", len(jobs))
    pipe.hsetnx(name, "created", record.micros(time.time()))
    fields = own.fields() if own is not None else []
    for field, value in zip(fields[::2], fields[1::2], strict=True):
        pipe.hsetnx(name, field, value)
    if own is not None and own.hold:
        pipe.sadd(keys.batch_holds_key(batch_id), own.hold)
    pipe.hdel(name, "finished")
    pipe.hset(name, "ttl", max(j.ttl_s for j in jobs))
    ttl = max(max(queued_ttl_s, j.ttl_s) for j in jobs)
    names = [name, keys.batch_jobs_key(batch_id), keys.batch_results_key(batch_id)]
    if own is not None and own.hold:
        names.append(keys.batch_holds_key(batch_id))
    for key in names:
        pipe.expire(key, ttl, gt=True)  # never shortened
        pipe.expire(key, ttl, nx=True)  # set where there was none
