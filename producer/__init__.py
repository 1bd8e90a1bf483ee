"""Submit image URIs for classification and read the results. Needs no PyTorch."""

from producer.client import Client, SubmitRequest

__all__ = ["Client", "SubmitRequest"]
