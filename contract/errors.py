"""The service's errors: each has a wire ``type`` that reaches the caller.

A job that fails stores ``{"type", "message"}``; ``JobFailed`` raises it again on the caller's side.
"""

from __future__ import annotations

from typing import ClassVar


class ServiceError(Exception):
    """Base of every error the service reports."""

    type: ClassVar[str] = "internal"

    def to_dict(self) -> dict[str, str]:
        return {"type": self.type, "message": str(self)}


class NotFound(ServiceError):
    """The file, bucket, key or URL does not exist."""

    type = "not_found"


class AccessDenied(ServiceError):
    """The source exists but may not be read: outside the allowed roots, a private address, 403."""

    type = "access_denied"


class NotAnImage(ServiceError):
    """The bytes are not an image this service can decode (or are truncated)."""

    type = "not_an_image"


class TooLarge(ServiceError):
    """The file exceeds the byte cap or the image exceeds the pixel cap."""

    type = "too_large"


class UnsupportedModel(ServiceError):
    """No worker serves this model, or the model cannot be loaded."""

    type = "unsupported_model"


class InvalidRequest(ServiceError):
    """The request itself is malformed: bad URI scheme, top_k out of range, bad job ID."""

    type = "invalid_request"


class IdConflict(ServiceError):
    """A job ID that already exists was submitted again with a different request."""

    type = "conflict"


class AlreadyFinal(ServiceError):
    """A job cannot be cancelled: it is final already (done, failed, cancelled or expired)."""

    type = "already_final"


class Unavailable(ServiceError):
    """A source timed out, throttled or answered 5xx, and retries with backoff did not help."""

    type = "unavailable"


class DeadlineExceeded(ServiceError):
    """Fetching a source took longer than the overall fetch deadline (a slow or dripping source).

    Not an ``Unavailable``: the fetch's retries are bounded by the same deadline, so retrying
    inside it cannot help; the source is at fault, never the worker (it is not a poison pill).
    """

    type = "deadline_exceeded"
    transient = True


class PoisonJob(ServiceError):
    """The job was delivered too many times: each attempt ended with its worker dying.

    Never raised in Python: the claim script in ``contract.store`` writes its ``type``.
    """

    type = "poison"


class MalformedMessage(ServiceError):
    """A queue message or job record could not be decoded."""

    type = "malformed_message"


class InternalError(ServiceError):
    """An unexpected failure inside the worker; the message names the original exception."""

    type = "internal"


class MalformedRecord(MalformedMessage):
    """A job or model record read from Redis does not follow the contract."""


class JobFailed(Exception):
    """Raised on the caller's side for a job that ended without predictions: ``failed`` (its
    error's type), ``cancelled`` or ``expired`` (the status as the type)."""

    def __init__(self, job_id: str, type: str, message: str) -> None:
        super().__init__(f"job {job_id} failed ({type}): {message}")
        self.job_id = job_id
        self.type = type
        self.message = message


def as_service_error(exc: BaseException) -> ServiceError:
    """Wrap an unexpected exception so that it still reaches the caller as ``{type, message}``."""
    if isinstance(exc, ServiceError):
        return exc
    return InternalError(f"{exc.__class__.__name__}: {exc}")
