"""The core's errors, each defined once with its HTTP status and gRPC code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import grpc


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field: rendered as ``details`` (HTTP) and ``google.rpc.BadRequest`` (gRPC)."""

    field: str
    reason: str


class SidecarError(Exception):
    """Base of every error a client can see. Subclasses fix the three codes.

    The message is for humans and must never carry internals (paths, stack
    traces, SQL): handlers send it to the client as it is.
    """

    code: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500
    grpc_status: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    default_message: ClassVar[str] = "internal error"

    def __init__(
        self,
        message: str | None = None,
        *,
        details: tuple[FieldViolation, ...] = (),
        retry_after: float | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.details = details
        self.retry_after = retry_after
        super().__init__(self.message)

    def to_json(self) -> dict[str, object]:
        """The one error body shape of SPEC §2."""
        return {
            "error": {
                "code": self.code,
                "message": self.message,
                "details": [{"field": d.field, "reason": d.reason} for d in self.details],
            }
        }


class InvalidArgument(SidecarError):
    code = "invalid_argument"
    http_status = 400
    grpc_status = grpc.StatusCode.INVALID_ARGUMENT
    default_message = "the request is invalid"


class Unauthenticated(SidecarError):
    code = "unauthenticated"
    http_status = 401
    grpc_status = grpc.StatusCode.UNAUTHENTICATED
    default_message = "a valid bearer token is required"


class NotFound(SidecarError):
    code = "not_found"
    http_status = 404
    grpc_status = grpc.StatusCode.NOT_FOUND
    default_message = "not found"


class MethodNotAllowed(SidecarError):
    """A route asked with a method it does not take (aiohttp's router, or a POST-only
    admin route asked with GET); HTTP only, the answer carries ``Allow``."""

    code = "method_not_allowed"
    http_status = 405
    grpc_status = grpc.StatusCode.UNIMPLEMENTED
    default_message = "this method is not allowed here"


class Conflict(SidecarError):
    code = "conflict"
    http_status = 409
    grpc_status = grpc.StatusCode.ALREADY_EXISTS
    default_message = "this messageId was already used in this conversation with other content"


class FailedPrecondition(SidecarError):
    code = "failed_precondition"
    http_status = 409
    grpc_status = grpc.StatusCode.FAILED_PRECONDITION
    default_message = "the sidecar is not in a state to do this"


class PayloadTooLarge(SidecarError):
    code = "payload_too_large"
    http_status = 413
    grpc_status = grpc.StatusCode.INVALID_ARGUMENT
    default_message = "the request body is too large"


class UnsupportedMediaType(SidecarError):
    code = "unsupported_media_type"
    http_status = 415
    grpc_status = grpc.StatusCode.INVALID_ARGUMENT
    default_message = "send a JSON body; form and multipart bodies are not accepted"


class Overloaded(SidecarError):
    code = "overloaded"
    http_status = 429
    grpc_status = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_message = "too much pending work; retry later"


class SlowConsumer(SidecarError):
    code = "slow_consumer"
    http_status = 429
    grpc_status = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_message = "the subscriber fell too far behind; resume from the last sequence seen"

    def __init__(self, message: str | None = None, *, retry_after: float = 1.0) -> None:
        # Always with RetryInfo: clients tell this RESOURCE_EXHAUSTED (resume) from an
        # oversized request's (do not retry it unchanged) by it (docs/reliability.md).
        super().__init__(message, retry_after=retry_after)


class CursorExpired(SidecarError):
    code = "out_of_range"
    http_status = 410
    grpc_status = grpc.StatusCode.OUT_OF_RANGE
    default_message = "the cursor is older than the replies retained"


class Unavailable(SidecarError):
    code = "unavailable"
    http_status = 503
    grpc_status = grpc.StatusCode.UNAVAILABLE
    default_message = "the sidecar is shutting down or not ready"


class StoreRefused(Unavailable):
    """The store refused a step before running it (a full disk, Redis out of memory or
    read-only, another sidecar holding the prefix): unlike a lost answer, nothing of
    it landed, so nothing needs to be looked for afterwards. The same answer to clients."""


class RequestTimeout(SidecarError):
    """A request body that did not arrive in time: a slow sender would otherwise hold
    its connection (one of http_max_connections) for as long as it likes."""

    code = "request_timeout"
    http_status = 408
    grpc_status = grpc.StatusCode.DEADLINE_EXCEEDED
    default_message = "the request body did not arrive in time"


class Internal(SidecarError):
    """Anything unexpected; the handler logs the cause and shows only this."""
