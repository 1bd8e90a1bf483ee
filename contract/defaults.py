"""Every default of the service, each a named constant with one line saying what it is."""

# Redis URL used when neither --redis-url nor REDIS_URL is given.
REDIS_URL = "redis://127.0.0.1:6379/0"
# Prefix of every Redis key and Celery queue the service owns.
KEY_PREFIX = "imgcls"
# Seconds a job record lives in Redis after submission (24 h).
JOB_TTL_S = 24 * 3600
# Entries the job events stream keeps (approximately: trimmed with MAXLEN ~).
EVENTS_MAX_LEN = 100_000
# Seconds after which a process writes the names and labels its records refer to again, in
# case Redis lost them (a restart without persistence).
CATALOG_REWRITE_S = 60.0
# Labels returned per job when the caller does not say.
TOP_K = 5
# Largest top_k a caller may ask for.
MAX_TOP_K = 1000
# Model served when the caller does not name one.
MODEL = "resnet50"
# Job IDs carried by one queue message; one message per image cannot feed a GPU.
CHUNK_SIZE = 64
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
