"""Errors that carry their HTTP status. One base class, a few subclasses, one exception handler."""

from __future__ import annotations

from pydantic import ValidationError


class OfframpError(Exception):
    """Base error: `str(err)` is the message a client sees, `status_code` the HTTP status."""

    status_code: int = 500

    def __init__(self, message: str, status_code: int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code
        self.headers = headers or {}


class BadRequest(OfframpError):
    status_code = 400


class Unauthorized(OfframpError):
    status_code = 401

    def __init__(self, message: str):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(OfframpError):
    status_code = 403


class NotFound(OfframpError):
    status_code = 404


class Conflict(OfframpError):
    """The request is well formed but the model's current state cannot answer it (409)."""

    status_code = 409


class BodyTimeout(OfframpError):
    """The body did not arrive in time: the connection is closed after the answer."""

    status_code = 408

    def __init__(self, message: str):
        super().__init__(message, headers={"Connection": "close"})


class PreconditionFailed(OfframpError):
    status_code = 412


class PayloadTooLarge(OfframpError):
    status_code = 413


class Unprocessable(OfframpError):
    status_code = 422


class Overloaded(OfframpError):
    """The queue is full: the client should come back later."""

    status_code = 503

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message, headers={"Retry-After": str(max(1, round(retry_after_s)))})


class NotReady(OfframpError):
    status_code = 503


class RequestTimeout(OfframpError):
    status_code = 504


class StateError(OfframpError):
    """The policy state directory cannot be used (a file where a directory belongs, no permission):
    the message names the path and the fix. At start-up it stops the server in one line."""

    status_code = 503


class BundleError(ValueError):
    """A bundle that cannot be served. The message names the file and what is wrong with it."""


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type when it has none), for one-line logs."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def validation_problems(err: ValidationError, root: str = "body") -> str:
    """A pydantic ValidationError as one line: `field.path: message; ...`."""
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or root}: {e['msg']}" for e in err.errors(include_url=False)
    )
