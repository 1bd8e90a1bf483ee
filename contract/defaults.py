"""Every default of the service, each a named constant with one line saying what it is."""

# Redis URL used when neither --redis-url nor REDIS_URL is given.
REDIS_URL = "redis://127.0.0.1:6379/0"
# Prefix of every Redis key and Celery queue the service owns.
KEY_PREFIX = "imgcls"
# Seconds a job record is kept in Redis once the job is final (24 h), unless its submission set
# its own ``ttl_s``.
JOB_TTL_S = 24 * 3600
# Seconds a record lives while queued or running, at least (24 h): the time a job may wait in
# the queue. A record gets max(QUEUED_TTL_S, its ttl_s) at submission, its ttl_s when final.
QUEUED_TTL_S = 24 * 3600
# Longest ttl_s a submission may set (30 days).
MAX_TTL_S = 30 * 24 * 3600
# Latest deadline accepted, in Unix seconds (year 5138): a larger number is taken for
# milliseconds by mistake.
MAX_DEADLINE = 1e11
# Longest relative deadline (deadline_s) the CLI and the gateway accept (30 days).
MAX_DEADLINE_S = 30 * 24 * 3600
# Seconds after which a process writes the names and labels its records refer to again, in
# case Redis lost them (a restart without persistence).
CATALOG_REWRITE_S = 60.0
# Labels returned per job when the caller does not say.
TOP_K = 5
# Largest top_k a caller may ask for.
MAX_TOP_K = 1000
# Model served when the caller does not name one.
MODEL = "resnet50"
# Most job IDs one queue message carries: one message per image cannot feed a GPU, and each
# message costs Redis about as much as 40 of its jobs on the host path (README, "Per-job cost").
# Larger messages cost less a job, but a worker holds its concurrency's worth of them, and a
# high-priority job waits for what it holds (128 x 2 on a CPU: as long as 64 x 4 did).
CHUNK_SIZE = 128
# A submission is spread over at least this many messages, while each still carries at least
# MIN_CHUNK_SIZE jobs: a burst of a few hundred jobs is shared by several worker processes.
SPREAD_MESSAGES = 8
MIN_CHUNK_SIZE = 64
# Deliveries of one job before it is failed as a poison pill.
MAX_ATTEMPTS = 3
# Seconds an unacknowledged message waits before Redis hands it to another worker.
VISIBILITY_TIMEOUT_S = 300
# Longest accepted job ID.
MAX_JOB_ID_LEN = 128
# Longest accepted URI.
MAX_URI_LEN = 4096
# Seconds between worker heartbeats; a worker is live while its heartbeat key exists.
HEARTBEAT_S = 5
# Seconds a heartbeat key outlives its last refresh.
HEARTBEAT_TTL_S = 15
# Seconds a waiting client blocks on the finished-jobs channel before re-reading records.
WAIT_RECHECK_S = 1.0
# Most entries the dead-letter list keeps; the oldest go first.
DEAD_LETTER_MAX_ENTRIES = 10_000
# Seconds a dead-letter entry is kept (7 days); older ones are trimmed as new ones are written.
DEAD_LETTER_MAX_AGE_S = 7 * 24 * 3600
# Job IDs listed in one dead-letter entry; the entry also counts them all.
DEAD_LETTER_MAX_IDS = 100
# Bytes of completion events the stream keeps, about: each call trims it (its last XADD's
# MAXLEN ~) to as many entries as make this at the size of its own entries; the oldest go first.
# An entry holds the jobs one store call ended with one status: about 0.6 million entries of
# one job, 1.7 million jobs in entries of 64. A reader that falls further behind misses events.
EVENTS_MAX_BYTES = 64 * 2**20
# Consumer group of the webhook sender on the events stream.
WEBHOOK_GROUP = "webhooks"
# Seconds a webhook is retried after its first try before it is given up (24 h).
WEBHOOK_MAX_AGE_S = 24 * 3600
# Seconds before the first webhook retry; each later one waits twice as long, with jitter.
WEBHOOK_RETRY_BASE_S = 5.0
# Longest wait between two webhook retries (1 h).
WEBHOOK_RETRY_MAX_S = 3600.0
# Seconds a webhook POST may take to connect, and to answer.
WEBHOOK_TIMEOUT_S = 10.0
# Webhook POSTs in flight at once.
WEBHOOK_CONCURRENCY = 8
# Most entries the list of given-up webhooks keeps; the oldest go first.
WEBHOOK_DEAD_MAX_ENTRIES = 10_000
# Consumer group of the results sink (python -m sink) on the events stream.
SINK_GROUP = "sink"
# Job records a batch results page (GET /v1/batches/{id}/results) holds unless asked otherwise.
BATCH_PAGE = 10_000
# Most job records one batch results page may hold.
MAX_BATCH_PAGE = 100_000
