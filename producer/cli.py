"""``python -m producer``: submit image URIs and read results, one JSON record per line.

Also runs the HTTP gateway (``serve``), shows each model's pool (``status``) and exports
results (``export``). Every option has an environment-variable fallback where an operator
would want one.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import IO, Any, TypeVar

import click
import redis

from contract import deadletter, defaults, redis_errors, registry
from contract.batch import Batch
from contract.connection import connect
from contract.errors import ServiceError, Unavailable
from contract.job import PRIORITIES, Job, Priority, validate_model_ref
from contract.logs import configure_logging
from contract.shards import parse_urls
from producer import bulk, export
from producer.client import Client, SubmitRequest

log = logging.getLogger("producer")
F = TypeVar("F", bound=Callable[..., Any])
R = TypeVar("R")


def _remember_url(ctx: click.Context, _: click.Parameter, url: str) -> str:
    """Kept on the root context, so that a Redis failure can name the URL (masked)."""
    ctx.find_root().meta["redis_url"] = url
    return url


def _remember_store_urls(ctx: click.Context, _: click.Parameter, urls: tuple[str, ...]) -> None:
    try:
        ctx.find_root().meta["store_urls"] = parse_urls(urls)
    except ValueError as e:
        raise click.BadParameter(str(e)) from e


def _store_urls() -> tuple[str, ...]:
    """The ``--store-url`` list of the command being run (empty: the records are on Redis)."""
    urls: tuple[str, ...] = click.get_current_context().find_root().meta.get("store_urls", ())
    return urls


_redis_url_option = click.option(
    "--redis-url",
    envvar="REDIS_URL",
    default=defaults.REDIS_URL,
    show_default=True,
    callback=_remember_url,
    help="Redis holding the queues (and the job records unless --store-url) (env REDIS_URL).",
)
_store_url_option = click.option(
    "--store-url",
    envvar="IMGCLS_STORE_URLS",
    multiple=True,
    expose_value=False,
    callback=_remember_store_urls,
    help="Redis holding a shard of the job records (repeatable, or comma-separated in env "
    "IMGCLS_STORE_URLS); the same list, in the same order, as the workers' [default: "
    "--redis-url].",
)

# Where commands that take job IDs read them from, beside their arguments.
_ids_file_option = click.option(
    "--file",
    "from_file",
    type=click.File("r"),
    help="Read job IDs from this file ('-' for standard input): one ID per line, or the JSON "
    "lines that submit prints.",
)


def redis_option(f: F) -> F:
    """``--redis-url`` and ``--store-url``: where the queues and the job records are."""
    return _redis_url_option(_store_url_option(f))


class _Commands(click.Group):
    """Turns a Redis failure in any command into one line on stderr and its exit status."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except redis_errors.REDIS_ERRORS as e:
            url = ctx.meta.get("redis_url", defaults.REDIS_URL)
            code, line = redis_errors.describe(e, url)
            click.echo(f"Error: {line}", err=True)
            ctx.exit(code)


def log_options(default_level: str) -> Callable[[F], F]:
    """``--log-level`` and ``--log-json``, shared by every command."""

    def decorate(f: F) -> F:
        f = click.option(
            "--log-json/--no-log-json",
            envvar="IMGCLS_LOG_JSON",
            default=False,
            help="Write logs (and --summary) to stderr as JSON lines (env IMGCLS_LOG_JSON).",
        )(f)
        return click.option(
            "--log-level",
            envvar="IMGCLS_LOG_LEVEL",
            default=default_level,
            show_default=True,
            type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
            help="Least severe log level written to stderr (env IMGCLS_LOG_LEVEL).",
        )(f)

    return decorate


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Submit images for classification and read their results.

    Exit status: 0 on success; 1 when a request is refused (an unsupported model, an invalid
    URI, an ID taken by another request, a job to cancel already final or unknown) or a job
    failed; 2 for a usage error; 3 when Redis is unreachable; 4 when Redis refuses the password;
    5 when jobs were unfinished at the end of --wait; 6 when jobs were cancelled or expired
    (and none failed or was unfinished); 130 on Ctrl-C (submit prints every queued job first).
    """


@main.command()
@redis_option
@click.option(
    "--model",
    default=defaults.MODEL,
    show_default=True,
    help="Model to classify with, or NAME@VERSION to pin a version; a worker must serve it.",
)
@click.option("--top-k", default=defaults.TOP_K, show_default=True, help="Labels per image.")
@click.option(
    "--callback-url",
    help="POST each job's final record here as a signed webhook (sent by python -m notifier).",
)
@click.option(
    "--priority",
    type=click.Choice([p.value for p in PRIORITIES]),
    default=Priority.NORMAL.value,
    show_default=True,
    help="Each model's workers serve high jobs first, low jobs last.",
)
@click.option(
    "--batch",
    help="Batch the jobs join (created on first use) [default: a new one for more than one "
    "URI or an --output]; see `batch status`.",
)
@click.option(
    "--output",
    help="Results sink of the batch: s3://bucket/prefix/ or a directory under the sink's "
    "root, where python -m sink writes each finished record (JSONL parts).",
)
@click.option(
    "--deadline-s",
    type=click.FloatRange(min=0, min_open=True, max=defaults.MAX_DEADLINE_S),
    help="A job not started this many seconds after submit ends 'expired', never fetched or run.",
)
@click.option(
    "--ttl-s",
    type=click.IntRange(min=1, max=defaults.MAX_TTL_S),
    help=f"Keep each record this many seconds once the job is final [default: "
    f"{defaults.JOB_TTL_S}].",
)
@click.option(
    "--wait",
    type=float,
    default=None,
    help="Wait up to this many seconds, printing each job's record as it becomes final "
    "(in the order they finish); the unfinished ones follow at the timeout.",
)
@click.option(
    "--ordered/--unordered",
    default=False,
    help="With --wait, print in input order: each record once every earlier one is final.",
)
@click.option(
    "--file",
    "from_file",
    # Bytes that are not UTF-8 become surrogate escapes, which the URI check refuses by line.
    type=click.File("r", encoding="utf-8", errors="surrogateescape"),
    help="Read URIs from this file, one per line ('-' for standard input).",
)
@click.option(
    "--s3-prefix",
    help="Also submit every object under this prefix (s3://bucket/prefix), listed page by "
    "page with boto3's standard credentials and AWS_ENDPOINT_URL.",
)
@click.option(
    "--chunk-size",
    default=defaults.CHUNK_SIZE,
    show_default=True,
    type=click.IntRange(min=1),
    help="Most jobs per queue message (a few hundred jobs are spread over several messages).",
)
@click.option(
    "--progress/--no-progress",
    default=False,
    help="Show a progress bar on stderr: jobs queued, then jobs finished with --wait.",
)
@click.option(
    "--summary/--no-summary",
    default=False,
    help="At the end, write to stderr: done, failed by error type, pending, and img/s "
    "(finished jobs per second with --wait, else queued jobs per second).",
)
@log_options("warning")
@click.argument("uris", nargs=-1)
def submit(
    redis_url: str,
    model: str,
    top_k: int,
    callback_url: str | None,
    priority: str,
    batch: str | None,
    output: str | None,
    deadline_s: float | None,
    ttl_s: int | None,
    wait: float | None,
    ordered: bool,
    from_file: IO[str] | None,
    s3_prefix: str | None,
    chunk_size: int,
    progress: bool,
    summary: bool,
    log_level: str,
    log_json: bool,
    uris: tuple[str, ...],
) -> None:
    """Queue one job per URI (a path, s3://bucket/key or http(s)://); print their records.

    Prints one JSON record per line: as queued, in input order; or with --wait, each once
    final. URIS may be '-' to read them from standard input. A relative path is made
    absolute against the current directory before it is queued.

    Ctrl-C stops submitting and waiting (the jobs keep running) after printing the record
    of every job queued so far; a second Ctrl-C aborts at once.

    \b
    Exit status:
      0  every job queued (without --wait) or done (with --wait)
      1  some job failed, or a request was refused (nothing more is queued)
      5  some job was still queued or running when --wait ran out
      6  some job was cancelled or expired (with --wait; none failed or unfinished)
      130  interrupted by Ctrl-C
      2, 3, 4  usage error, Redis unreachable, Redis refused the password
    """
    configure_logging(log_level, log_json)
    report = bulk.Summary()
    printer = _Printer(report)
    client = Client.from_url(redis_url, _store_urls(), chunk_size=chunk_size)
    with _first_sigint_stops() as interrupted:
        try:
            requests = _uris(uris, from_file, s3_prefix)
            deadline = None if deadline_s is None else time.time() + deadline_s
            queue = _Queue(model, top_k, callback_url, priority, batch, output, deadline, ttl_s)
            _queue(client, requests, queue, printer, wait is None, progress, interrupted)
            if wait is not None:
                _print_finals(client, printer, wait, ordered, progress, interrupted)
        except ServiceError as e:
            _fail(e, log_json)
        finally:
            printer.rest(client)
            client.close()
    report.stop()
    log.info("submitted %d jobs to %s", report.submitted, model, extra=report.to_dict())
    if summary:
        click.echo(json.dumps(report.to_dict()) if log_json else report.text(), err=True)
    code = bulk.EXIT_INTERRUPTED if interrupted() else report.exit_status(wait is not None)
    click.get_current_context().exit(code)


class _Printer:
    """Prints one JSON line per job and remembers the queued jobs it has not printed yet, so
    that a run cut short still prints every job ID it queued."""

    def __init__(self, report: bulk.Summary) -> None:
        self.report = report
        self.unprinted: dict[str, None] = {}

    def queued(self, jobs: list[Job], show: bool) -> None:
        self.report.submitted += len(jobs)
        for job in jobs:
            if show:
                self.line(job.id, job)
            else:
                self.unprinted[job.id] = None

    def line(self, job_id: str, job: Job | None) -> None:
        self.unprinted.pop(job_id, None)
        click.echo(json.dumps(bulk.record(job_id, job)))
        self.report.add([job])

    def rest(self, client: Client) -> None:
        """Print the jobs not printed yet as they are now; as unreadable if Redis fails."""
        ids = list(self.unprinted)
        try:
            for chunk in export.chunks(iter(ids)):
                for job_id, job in zip(chunk, client.get_many(chunk), strict=True):
                    self.line(job_id, job)
        except redis_errors.REDIS_ERRORS as e:
            for job_id in list(self.unprinted):
                message = f"queued, but its record could not be read: {e}"
                error = {"type": Unavailable.type, "message": message}
                click.echo(json.dumps({"id": job_id, "status": None, "error": error}))
            self.unprinted.clear()
            raise


@dataclass(frozen=True)
class _Queue:
    """What every job of one ``submit`` is queued with."""

    model: str
    top_k: int
    callback_url: str | None
    priority: str
    batch: str | None
    output: str | None
    deadline: float | None = None
    ttl_s: int | None = None


def _queue(
    client: Client,
    requests: Iterable[SubmitRequest],
    queue: _Queue,
    printer: _Printer,
    show: bool,
    progress: bool,
    interrupted: Callable[[], bool],
) -> None:
    """Submit batch by batch, stopping between batches on Ctrl-C."""
    bar = _tqdm(None, "queued") if progress else None
    batches = client.iter_submit_batches(
        requests,
        model=queue.model,
        top_k=queue.top_k,
        callback_url=queue.callback_url,
        priority=queue.priority,
        batch=queue.batch,
        output=queue.output,
        deadline=queue.deadline,
        ttl_s=queue.ttl_s,
    )
    with contextlib.closing(batches):  # closed now, not when collected: it releases the batch
        for jobs in batches:
            printer.queued(jobs, show)
            if bar is not None:
                bar.update(len(jobs))
            if interrupted():
                break
    if bar is not None:
        bar.close()


def _print_finals(
    client: Client,
    printer: _Printer,
    wait: float,
    ordered: bool,
    progress: bool,
    interrupted: Callable[[], bool],
) -> None:
    ids = list(printer.unprinted)
    finals = client.as_finished(ids, wait, stop=interrupted)
    if ordered:
        finals = bulk.in_input_order(ids, finals)
    if progress:
        finals = _tqdm(len(ids), "finished", finals)
    for job_id, job in finals:
        printer.line(job_id, job)


@contextlib.contextmanager
def _first_sigint_stops() -> Iterator[Callable[[], bool]]:
    """The first Ctrl-C only sets a flag, which the command checks between batches and at least
    once a second while waiting; a second one raises KeyboardInterrupt at once."""
    hits: list[int] = []

    def handle(signum: int, _: object) -> None:
        hits.append(signum)
        if len(hits) > 1:
            raise KeyboardInterrupt
        click.echo("interrupted: printing every queued job's record (they keep running)", err=True)

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield lambda: bool(hits)
    finally:
        signal.signal(signal.SIGINT, previous)


def _tqdm(total: int | None, what: str, items: Iterable[Any] | None = None) -> Any:
    from tqdm import tqdm

    return tqdm(items, total=total, desc=what, unit="img", file=sys.stderr, dynamic_ncols=True)


@main.command()
@redis_option
@click.option("--wait", type=float, default=0.0, help="Wait up to this many seconds for each.")
@click.argument("job_ids", nargs=-1, required=True)
def result(redis_url: str, wait: float, job_ids: tuple[str, ...]) -> None:
    """Print the records of JOB_IDS, one JSON line each, in order.

    An unknown or expired ID prints {"id": ID, "status": null, "error": {"type":
    "not_found", ...}}.

    \b
    Exit status:
      0  every job done
      1  some job failed or was not found
      5  some job still queued or running (at the end of --wait)
      6  some job cancelled or expired (none failed, not found or unfinished)
      2, 3, 4  usage error, Redis unreachable, Redis refused the password
    """
    report = bulk.Summary()
    client = Client.from_url(redis_url, _store_urls())
    try:
        for job_id, job in zip(job_ids, client.wait_many(list(job_ids), wait), strict=True):
            click.echo(json.dumps(bulk.record(job_id, job)))
            report.add([job])
    finally:
        client.close()
    click.get_current_context().exit(report.exit_status(waited=True))


@main.group()
def batch() -> None:
    """A batch's progress, its results (JSONL from a cursor), cancelling or closing it."""


@batch.command("status")
@redis_option
@click.argument("batch_id")
def batch_status(redis_url: str, batch_id: str) -> None:
    """Print the batch's counts by status, progress and times as one JSON line.

    Exit status: 0 when the batch is finished, 5 while jobs are pending, 1 when it is
    unknown or expired."""
    found = _ask(redis_url, lambda client: client.batch(batch_id))
    if found is None:
        message = f"no batch {batch_id!r} (never submitted, or expired)"
        raise click.ClickException(f"not_found: {message}")
    _print_batch(found)


@batch.command("cancel")
@redis_option
@click.argument("batch_id")
def batch_cancel(redis_url: str, batch_id: str) -> None:
    """Cancel every job of the batch not final yet: queued ones never run, running ones'
    results are discarded. Prints {"cancelled": N, "batch": {...}} as one JSON line.

    Exit status: 0 when cancelled, 1 when the batch is unknown, expired or finished already
    (nothing changed)."""
    cancelled, state = _ask(redis_url, lambda client: client.cancel_batch(batch_id))
    click.echo(json.dumps({"cancelled": cancelled, "batch": state.to_dict()}))


@batch.command("close")
@redis_option
@click.argument("batch_id")
def batch_close(redis_url: str, batch_id: str) -> None:
    """Let a batch held open (submitted with keep_open, or by a submission that died midway)
    finish: now if all its jobs are final, else with the last of them. Prints the batch as one
    JSON line.

    Exit status: 0 when the batch is finished, 5 while jobs are pending, 1 when it is unknown
    or expired."""
    _print_batch(_ask(redis_url, lambda client: client.close_batch(batch_id)))


def _ask(redis_url: str, call: Callable[[Client], R]) -> R:
    """``call``'s answer, with a client of ``redis_url`` (and the store shards) closed after; a
    refusal is the command's error."""
    client = Client.from_url(redis_url, _store_urls())
    try:
        return call(client)
    except ServiceError as e:
        raise click.ClickException(f"{e.type}: {e}") from e
    finally:
        client.close()


def _print_batch(state: Batch) -> None:
    """The batch as one JSON line; exit 0 when it is finished, 5 while jobs are pending."""
    click.echo(json.dumps(state.to_dict()))
    click.get_current_context().exit(0 if state.is_finished else bulk.EXIT_UNFINISHED)


@batch.command("results")
@redis_option
@click.option("--cursor", help="Read on from here: the cursor a previous run printed.")
@click.option(
    "--follow",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Keep printing records as jobs finish, until the batch is finished or this many "
    "seconds have passed.",
)
@click.argument("batch_id")
def batch_results(redis_url: str, cursor: str | None, follow: float, batch_id: str) -> None:
    """Print the records of the batch's final jobs, one JSON line each, in the order they
    became final; then, on stderr, `cursor C` to read on from with --cursor C.

    Exit status: 0 once every record is printed (the batch is finished), 5 when the batch
    still has pending jobs, 1 when it is unknown or expired."""
    client = Client.from_url(redis_url, _store_urls())
    complete = False
    try:
        for page in client.iter_batch_results(batch_id, cursor, follow=follow):
            for job_id, job in page.records:
                click.echo(json.dumps(bulk.record(job_id, job)))
            cursor, complete = page.cursor, page.complete
    except ServiceError as e:
        raise click.ClickException(f"{e.type}: {e}") from e
    finally:
        client.close()
    click.echo(f"cursor {cursor}", err=True)
    click.get_current_context().exit(0 if complete else bulk.EXIT_UNFINISHED)


@main.command()
@redis_option
@_ids_file_option
@click.argument("job_ids", nargs=-1)
def cancel(redis_url: str, from_file: IO[str] | None, job_ids: tuple[str, ...]) -> None:
    """Cancel jobs: a queued job never runs, a running job's result is discarded; each ends
    'cancelled'. JOB_IDS may be '-' to read them from standard input.

    Prints one JSON line per ID: {"id", "outcome", "status", "error"}, where outcome is
    cancelled (it was queued), cancelled_running, final (left as it was: error
    already_final), missing (error not_found) or corrupt (error malformed_message).

    \b
    Exit status:
      0  every job cancelled
      1  some job was final already, or not found (the others are cancelled)
      2, 3, 4  usage error, Redis unreachable, Redis refused the password
    """
    if job_ids == ("-",):
        job_ids, from_file = (), sys.stdin
    if not (job_ids or from_file):
        raise click.UsageError("give JOB_IDS, --file or '-'")
    client = Client.from_url(redis_url, _store_urls())
    refused = 0
    try:
        for chunk in export.chunks(_ids(job_ids, from_file)):
            outcomes = client.cancel_many(chunk)
            for job_id, outcome, job in zip(chunk, outcomes, client.get_many(chunk), strict=True):
                click.echo(json.dumps(bulk.cancel_line(job_id, outcome, job)))
                refused += not outcome.cancelled
    except ServiceError as e:
        _fail(e, log_json=False)
    finally:
        client.close()
    click.get_current_context().exit(bulk.EXIT_FAILED if refused else bulk.EXIT_DONE)


@main.command("export")
@redis_option
@_ids_file_option
@click.option(
    "--all", "every", is_flag=True, help="Export every job record in Redis (SCAN; no IDs)."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(export.FORMATS),
    default="jsonl",
    show_default=True,
    help="jsonl: the records as stored. csv: one row per job with the top label, its "
    "probability, all predictions as JSON and the error type and message.",
)
@click.option(
    "--output",
    "-o",
    type=click.File("w"),
    default="-",
    show_default=True,
    help="File to write ('-' for standard output).",
)
@click.option(
    "--wait", type=float, default=0.0, help="Wait up to this many seconds for each chunk."
)
@log_options("warning")
@click.argument("job_ids", nargs=-1)
def export_(
    redis_url: str,
    from_file: IO[str] | None,
    every: bool,
    fmt: str,
    output: IO[str],
    wait: float,
    log_level: str,
    log_json: bool,
    job_ids: tuple[str, ...],
) -> None:
    """Write job records to JSONL or CSV; unknown or expired IDs are counted, not written."""
    configure_logging(log_level, log_json)
    if not (job_ids or from_file or every):
        raise click.UsageError("give JOB_IDS, --file or --all")
    client = Client.from_url(redis_url, _store_urls())
    writer = export.Writer(output, fmt)
    missing = 0
    try:
        ids = export.all_job_ids(*client.store.clients) if every else _ids(job_ids, from_file)
        for chunk in export.chunks(ids):
            for job in client.wait_many(chunk, wait) if wait else client.get_many(chunk):
                if job is None:
                    missing += 1
                else:
                    writer.write(job)
    finally:
        client.close()
    log.info("exported %d records, %d unknown", writer.written, missing)
    click.echo(f"exported {writer.written} records ({missing} unknown or expired)", err=True)


def _ids(args: tuple[str, ...], from_file: IO[str] | None) -> Iterator[str]:
    yield from args
    if from_file is not None:
        yield from export.ids_from_lines(from_file)


@main.command()
@redis_option
@click.option(
    "--model",
    "models",
    multiple=True,
    help="Show only this model (repeatable) [default: every registered model].",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0),
    default=2.0,
    show_default=True,
    help="Seconds between the two samples of the done/failed counters that give the "
    "recent throughput; 0 skips it.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="One JSON object per model instead of a table."
)
def status(redis_url: str, models: tuple[str, ...], interval: float, as_json: bool) -> None:
    """Each model's queue depth, oldest queued job, live workers and recent throughput.

    QUEUED counts queue messages (each carries up to --chunk-size jobs); WORKERS counts
    workers with a live heartbeat; DONE, FAILED, CANCELLED and EXPIRED count the jobs that
    ended so; JOBS/S is jobs run to the end (done or failed) per second over --interval.
    """
    from producer import status as pool

    client = Client.from_url(redis_url, _store_urls())
    try:
        before = pool.snapshot(client.redis, models or None, records=client.store)
        after: dict[str, pool.ModelStatus] = {}
        if interval:
            time.sleep(interval)
            names = [s.model for s in before]
            after = {s.model: s for s in pool.snapshot(client.redis, names, records=client.store)}
    finally:
        client.close()
    rows = [_status_row(s, after.get(s.model)) for s in before]
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
    else:
        click.echo(_table(rows))


def _status_row(before: Any, after: Any | None) -> dict[str, Any]:
    from producer.status import throughput

    latest = after or before
    return {
        "model": latest.model,
        "queued": latest.queued,
        "oldest_age_s": latest.oldest_age_s,
        "workers": list(latest.workers),
        "live_workers": len(latest.workers),
        "done": latest.done,
        "failed": latest.failed,
        "cancelled": latest.cancelled,
        "expired": latest.expired,
        "jobs_per_s": None if after is None else round(throughput(before, after), 2),
    }


STATUS_COLUMNS = (
    *("MODEL", "QUEUED", "OLDEST_S", "WORKERS"),
    *("DONE", "FAILED", "CANCELLED", "EXPIRED", "JOBS/S"),
)


def _table(rows: list[dict[str, Any]]) -> str:
    header = STATUS_COLUMNS
    lines = [header] + [
        (
            r["model"],
            str(r["queued"]),
            "-" if r["oldest_age_s"] is None else f"{r['oldest_age_s']:.1f}",
            str(r["live_workers"]),
            str(r["done"]),
            str(r["failed"]),
            str(r["cancelled"]),
            str(r["expired"]),
            "-" if r["jobs_per_s"] is None else f"{r['jobs_per_s']:.1f}",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    cells = (zip(line, widths, strict=True) for line in lines)
    return "\n".join("  ".join(c.ljust(w) for c, w in row).rstrip() for row in cells)


@main.group()
def models() -> None:
    """Declare a model before any worker serves it, and list what producers accept.

    A declared model is accepted and queued while no worker runs (a pool scaled to zero);
    a worker's own registration, rewritten on every heartbeat, takes precedence while it
    exists. Declarations live in Redis: with persistence off, declare again after a restart.
    """


@models.command("declare")
@redis_option
@click.option(
    "--num-classes",
    type=click.IntRange(min=1),
    help="Classes the model's workers will answer with (top_k is checked against it); "
    "taken from the registration when --default-version names a registered version.",
)
@click.option("--weights", default="", help="Weights ID to show until a worker registers.")
@click.option(
    "--default-version",
    default="",
    help="The version unpinned jobs go to (see models list) [default: the one --weights and "
    "--num-classes make].",
)
@click.argument("name")
def declare(
    redis_url: str, num_classes: int | None, weights: str, default_version: str, name: str
) -> None:
    """Make a version NAME's default, and let producers queue jobs for it before any worker
    serves it; prints the record. Without a declaration the newest version is the default."""
    try:
        validate_model_ref(f"{name}@{default_version}" if default_version else name)
    except ServiceError as e:
        raise click.BadParameter(str(e), param_hint="NAME") from e
    client = Client.from_url(redis_url, _store_urls())
    try:
        if num_classes is None:
            known = default_version and registry.get_model(client.redis, name, default_version)
            if not known:
                raise click.BadParameter("give --num-classes", param_hint="--num-classes")
            num_classes, weights = known.num_classes, weights or known.weights
        info = registry.declare_model(client.redis, name, num_classes, weights, default_version)
    finally:
        client.close()
    click.echo(info.encode())


@models.command("list")
@redis_option
def list_models(redis_url: str) -> None:
    """One JSON line per model version producers accept (a worker's registration, else a
    declaration); ``default`` marks where unpinned jobs go."""
    client = Client.from_url(redis_url, _store_urls())
    try:
        for name in registry.known_models(client.redis):
            default = registry.get_model(client.redis, name)
            for info in registry.model_versions(client.redis, name):
                shown = {**asdict(info), "default": info.version == getattr(default, "version", "")}
                click.echo(json.dumps(shown))
    finally:
        client.close()


@main.command()
@redis_option
@click.option(
    "--host",
    envvar="IMGCLS_HOST",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; 0.0.0.0 in a container (env IMGCLS_HOST).",
)
@click.option(
    "--port", envvar="IMGCLS_PORT", default=8000, show_default=True, help="Port to listen on."
)
@click.option(
    "--token",
    envvar="IMGCLS_API_TOKEN",
    default=None,
    help="Require 'Authorization: Bearer TOKEN' on /v1/* (env IMGCLS_API_TOKEN; prefer the "
    "environment, so the token stays out of process listings) [default: no auth].",
)
@click.option(
    "--max-body-bytes",
    envvar="IMGCLS_MAX_BODY_BYTES",
    type=click.IntRange(min=1),
    default=1024 * 1024,
    show_default=True,
    help="Larger request bodies are refused with 413 (env IMGCLS_MAX_BODY_BYTES).",
)
@click.option(
    "--chunk-size",
    default=defaults.CHUNK_SIZE,
    show_default=True,
    type=click.IntRange(min=1),
    help="Most jobs per queue message (a few hundred jobs are spread over several messages).",
)
@log_options("info")
def serve(
    redis_url: str,
    host: str,
    port: int,
    token: str | None,
    max_body_bytes: int,
    chunk_size: int,
    log_level: str,
    log_json: bool,
) -> None:
    """Run the HTTP gateway: POST /v1/jobs, GET /v1/jobs/{id}, GET /v1/models, /docs."""
    import uvicorn

    from producer.gateway import GatewaySettings, create_app

    configure_logging(log_level, log_json)
    settings = GatewaySettings(redis_url, token or None, max_body_bytes, chunk_size, _store_urls())
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_config=None,
        log_level=log_level.lower(),
        timeout_graceful_shutdown=10,
    )


def _uris(
    args: tuple[str, ...], from_file: IO[str] | None, s3_prefix: str | None = None
) -> Iterator[SubmitRequest]:
    if args == ("-",):
        stdin = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="surrogateescape")
        args, from_file = (), stdin
    lines: Iterable[str] = from_file if from_file is not None else ()
    listed: Iterable[str] = bulk.s3_uris(s3_prefix) if s3_prefix else ()
    for uri in itertools.chain(args, lines):  # a line at a time: a stream is never held whole
        if uri.strip():
            yield SubmitRequest(uri.strip())
    for uri in listed:
        yield SubmitRequest(uri)


def _fail(e: ServiceError, log_json: bool) -> None:
    """Exit 1 with the error's type: as a JSON log line with --log-json, else as text."""
    if log_json:
        log.error("%s: %s", e.type, e, extra={"error_type": e.type})
        raise SystemExit(1) from e
    raise click.ClickException(f"{e.type}: {e}") from e


@main.group("dead-letter")
def dead_letter() -> None:
    """Read, replay or empty the dead-letter list (messages and records no worker could run)."""


@dead_letter.command("list")
@redis_option
@click.option("--limit", type=click.IntRange(min=1), help="Show only the oldest N entries.")
def dead_letter_list(redis_url: str, limit: int | None) -> None:
    """Print each entry as a JSON line with its index, oldest first."""
    with _redis(redis_url) as client:
        for entry in deadletter.entries(client, limit):
            click.echo(json.dumps({"index": entry.index, **entry.data}))


@dead_letter.command("replay")
@redis_option
@click.option("--all", "every", is_flag=True, help="Replay every entry that holds a message.")
@click.argument("indexes", nargs=-1, type=click.IntRange(min=0))
def dead_letter_replay(redis_url: str, every: bool, indexes: tuple[int, ...]) -> None:
    """Send the jobs of dead-lettered classify messages again, those still queued only.

    INDEXES are the indexes `dead-letter list` prints. A replayed entry leaves the list; one
    that holds no classify message (garbage, a missing record) is reported and kept.
    """
    if every == bool(indexes):
        raise click.UsageError("give either --all or the indexes of the entries to replay")
    client = Client.from_url(redis_url, _store_urls())
    try:
        chosen = [e for e in deadletter.entries(client.redis) if every or e.index in indexes]
        replayed = [e for e in chosen if _replay(client, e)]
        deadletter.remove(client.redis, replayed)
    finally:
        client.close()


def _replay(client: Client, entry: deadletter.Entry) -> bool:
    call = deadletter.classify_call(entry)
    sent = client.resend(call[1]) if call else []
    click.echo(json.dumps({"index": entry.index, "replayable": bool(call), "resent": sent}))
    return call is not None


@dead_letter.command("purge")
@redis_option
def dead_letter_purge(redis_url: str) -> None:
    """Empty the dead-letter list."""
    with _redis(redis_url) as client:
        click.echo(f"purged {deadletter.purge(client)} dead-letter entries", err=True)


@contextlib.contextmanager
def _redis(redis_url: str) -> Iterator[redis.Redis]:
    client = connect(redis_url)
    try:
        yield client
    finally:
        client.close()
