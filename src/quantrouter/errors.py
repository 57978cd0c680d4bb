"""One exception tree; each error carries what its gRPC status needs. A leaf module: it imports nothing of ours.

    QuantrouterError                      (INTERNAL)
    ├── InvalidRequest                    INVALID_ARGUMENT, with field violations
    │   └── MalformedRequest              INVALID_ARGUMENT (bytes protobuf cannot parse, e.g. bad UTF-8)
    ├── Unauthenticated                   UNAUTHENTICATED
    ├── ModelNotFound                     NOT_FOUND (unknown family or tag)
    ├── NoVariantFits                     RESOURCE_EXHAUSTED (memory), with every candidate's reason
    ├── ConstraintsUnsatisfiable          FAILED_PRECONDITION (explicit constraints), with the reasons
    ├── DeadlinePredicted                 DEADLINE_EXCEEDED (the deadline alone rules every variant out)
    ├── Overloaded                        RESOURCE_EXHAUSTED + RetryInfo (router's in-flight cap)
    ├── ShuttingDown                      UNAVAILABLE (draining)
    ├── NoLiveNode                        UNAVAILABLE (fleet: no node is live; says which and why)
    ├── NodeFailed                        UNAVAILABLE (fleet: the serving node failed after the first token)
    ├── NodeAnswered                      the node's own status, relayed by a fleet router
    └── BackendError                      the layer below (Ollama), translated in backend.py only
        ├── BackendUnavailable            UNAVAILABLE (connection refused, backend down)
        ├── BackendTimeout                DEADLINE_EXCEEDED
        ├── BackendBusy                   RESOURCE_EXHAUSTED + RetryInfo (Ollama 503 queue full)
        ├── BackendModelMissing           NOT_FOUND (404: the variant vanished)
        ├── BackendRejected               INVALID_ARGUMENT (400: Ollama refused the options)
        └── BackendFailed                 UNAVAILABLE (500 load failure, error mid-stream)

`started` on a BackendError says whether text had already been relayed; before the first token the
router may fall back to another variant, after it the stream ends with the error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc

__all__ = [
    "BackendBusy",
    "BackendError",
    "BackendFailed",
    "BackendModelMissing",
    "BackendRejected",
    "BackendTimeout",
    "BackendUnavailable",
    "ConstraintsUnsatisfiable",
    "DeadlinePredicted",
    "FieldViolation",
    "InvalidRequest",
    "MalformedRequest",
    "ModelNotFound",
    "NoLiveNode",
    "NoVariantFits",
    "NodeAnswered",
    "NodeFailed",
    "Overloaded",
    "QuantrouterError",
    "ShuttingDown",
    "Unauthenticated",
    "reporting_status",
]

# The ErrorInfo domain: globally unique, stable (AIP-193).
DOMAIN = "quantrouter.dev"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str


class QuantrouterError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str, *, retry_after: float | None = None,
                 violations: tuple[FieldViolation, ...] = (), metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.violations = violations
        self.metadata = metadata or {}


class InvalidRequest(QuantrouterError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_REQUEST"


class MalformedRequest(InvalidRequest):
    reason = "MALFORMED_REQUEST"


class Unauthenticated(QuantrouterError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "MISSING_OR_BAD_TOKEN"


class ModelNotFound(QuantrouterError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "MODEL_NOT_FOUND"


class NoVariantFits(QuantrouterError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "NO_VARIANT_FITS_MEMORY"


class ConstraintsUnsatisfiable(QuantrouterError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "NO_VARIANT_MEETS_CONSTRAINTS"


class DeadlinePredicted(QuantrouterError):
    """No variant is expected to finish before the deadline: answered up front rather than by the caller's own
    timer a moment later, so the status does not depend on a race. ErrorInfo metadata carries
    `predicted` and `best_expected_seconds`."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_PREDICTED"


class Overloaded(QuantrouterError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "ROUTER_OVERLOADED"


class ShuttingDown(QuantrouterError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "SHUTTING_DOWN"


class NoLiveNode(QuantrouterError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "NO_LIVE_NODE"


class NodeFailed(QuantrouterError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "NODE_FAILED"


class NodeAnswered(QuantrouterError):
    """A node router's error that a fleet router passes on as it came (its code and reason)."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str, *, retry_after: float | None = None,
                 metadata: dict[str, str] | None = None) -> None:
        super().__init__(message, retry_after=retry_after, metadata=metadata)
        self.code = code
        self.reason = reason or "NODE_ERROR"


class BackendError(QuantrouterError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "BACKEND_ERROR"
    started: bool = False


class BackendUnavailable(BackendError):
    reason = "BACKEND_UNAVAILABLE"


class BackendTimeout(BackendError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "BACKEND_TIMEOUT"


class BackendBusy(BackendError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "BACKEND_BUSY"


class BackendModelMissing(BackendError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "VARIANT_MISSING"


class BackendRejected(BackendError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "BACKEND_REJECTED_REQUEST"


class BackendFailed(BackendError):
    reason = "BACKEND_FAILED"


@contextmanager
def reporting_status(report: Callable[[grpc.StatusCode], None]) -> Iterator[None]:
    """Run the block, then `report` the status the call ends with, as the stream metrics count it: OK, the code
    of the QuantrouterError it raised, or CANCELLED for anything else (the caller left mid-stream)."""
    code = grpc.StatusCode.OK
    try:
        yield
    except QuantrouterError as error:
        code = error.code
        raise
    except BaseException:
        code = grpc.StatusCode.CANCELLED
        raise
    finally:
        report(code)
