"""The webhook sender: reads the completion-events stream and POSTs each job's final record to
its ``callback_url``, signed as Standard Webhooks describes, retrying for hours.

It runs as a process of its own (``python -m notifier``), never on a worker's hot path.
"""
