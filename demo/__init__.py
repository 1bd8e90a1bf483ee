"""Running the whole service on this machine alone: ``python -m demo`` and its building blocks."""
