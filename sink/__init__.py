"""The results sink: reads the completion-events stream and writes each finished record of a
batch that names an ``output`` (``s3://bucket/prefix/`` or a local directory) as JSONL parts.

It runs as a process of its own (``python -m sink run``), never on a worker's hot path, so that
a million-image batch does not need Redis to hold its results.
"""
