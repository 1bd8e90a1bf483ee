"""The contract between producers and workers: job schema, Redis keys, errors, Celery wiring.

Nothing here imports PyTorch, so clients that only submit and read jobs stay light.
"""
