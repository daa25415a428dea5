"""The project's error hierarchy. The service maps each class to one HTTP status, once."""
from __future__ import annotations


class TetriServeError(Exception):
    """Base of every error this package raises on purpose."""

    http_status = 500
    code = "internal"


class InvalidRequest(TetriServeError, ValueError):
    """The caller asked for something malformed or out of range."""

    http_status = 400
    code = "invalid_request"


class NotFound(TetriServeError, LookupError):
    """An unknown job, model or resource."""

    http_status = 404
    code = "not_found"


class Conflict(TetriServeError):
    """The request clashes with the current state (e.g. cancelling a finished job)."""

    http_status = 409
    code = "conflict"


class Gone(NotFound):
    """A job that existed but whose result has expired (or was forgotten)."""

    http_status = 410
    code = "gone"


class JobLost(Gone):
    """A job an earlier run of the service accepted and never finished (it stopped or was killed)."""

    code = "job_lost"


class RequestTimeout(InvalidRequest):
    """A request body that did not arrive in time."""

    http_status = 408
    code = "request_timeout"


class PayloadTooLarge(InvalidRequest):
    http_status = 413
    code = "payload_too_large"


class UnsupportedMediaType(InvalidRequest):
    """A request body in a content coding or type the service does not take."""

    http_status = 415
    code = "unsupported_media_type"


class Unauthorized(TetriServeError):
    http_status = 401
    code = "unauthorized"


class TooManyRequests(TetriServeError):
    http_status = 429
    code = "too_many_requests"


class PlanError(TetriServeError, AssertionError):
    """A policy produced a plan that cannot run (a bug in the policy, never the caller's fault)."""

    code = "invalid_plan"


class WorkerError(TetriServeError, RuntimeError):
    """A worker process failed while executing an assignment."""

    http_status = 503
    code = "worker_error"


class ServiceUnavailable(TetriServeError):
    """The scheduler service cannot be reached or is shutting down."""

    http_status = 503
    code = "unavailable"


class InsufficientMemory(Conflict):
    """A model (or adapter) does not fit a worker's memory budget even after evicting what may go.

    ``permanent``: it never will (larger than the whole budget); otherwise pinned or busy models hold
    the room now."""

    code = "insufficient_memory"

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent
