"""The embedded server's errors, each carrying the HTTP status Ollama answers with.

    EmbeddedError (500)
    ├── BadRequestError (400)      bad JSON, missing body or model, bad option or keep_alive
    ├── ModelNotFoundError (404)   `model '<name>' not found`
    ├── ServerBusyError (503)      the model's queue is full
    └── ModelLoadError (500)       llama.cpp could not load it, or it can never fit the budget

Statuses and messages follow ollama/ollama `server/routes.go` and `server/sched.go`.
"""

from __future__ import annotations

from http import HTTPStatus

__all__ = ["BadRequestError", "EmbeddedError", "ModelLoadError", "ModelNotFoundError", "ServerBusyError"]

# ollama/ollama `server/sched.go` ErrMaxQueue (two spaces after the full stop, verbatim).
MAX_QUEUE_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"


class EmbeddedError(Exception):
    """Base: a request the server answers with `{"error": message}` and `status`."""

    status: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequestError(EmbeddedError):
    """The request cannot be served as written."""

    status = HTTPStatus.BAD_REQUEST


class ModelNotFoundError(EmbeddedError):
    """No served model has this name."""

    status = HTTPStatus.NOT_FOUND

    def __init__(self, model: str) -> None:
        super().__init__(f"model '{model}' not found")


class ServerBusyError(EmbeddedError):
    """Too many requests already wait for this model."""

    status = HTTPStatus.SERVICE_UNAVAILABLE

    def __init__(self) -> None:
        super().__init__(MAX_QUEUE_MESSAGE)


class ModelLoadError(EmbeddedError):
    """The model could not be loaded: llama.cpp failed, or it needs more than the whole budget."""
