"""Errors that cross the wire, and the few the client raises on its own.

A server never dies on a bad request: it replies {"ok": false, "error": {"type", "message"}}
with `type` the class name of one of these, and the client re-raises it as `RemoteError`.
"""


class TSQPError(Exception):
    """Base class of every error this service raises on purpose."""


class BadRequest(TSQPError):
    """The message could not be decoded or its header is invalid."""


class VersionMismatch(BadRequest):
    """The peer speaks another protocol version."""


class UnknownMethod(BadRequest):
    """No such method on this server."""


class UnknownModule(BadRequest):
    """No such layer or module in this model."""


class BadShape(BadRequest):
    """A tensor's shape, dtype or byte length does not fit the request or the model."""


class TooLarge(BadRequest):
    """A request or its result is over the server's size cap."""


class RemoteError(TSQPError):
    """The server answered with an error reply."""

    def __init__(self, type: str, message: str):
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message


class ServerUnavailable(TSQPError):
    """Nothing answered at the endpoint within the deadline, after every retry."""


class ModelMismatch(TSQPError):
    """The server holds a different model than the one this client initialised with."""


def describe(e: Exception) -> str:
    """One line for a user: no traceback, the first validation problem, or the message."""
    errors = getattr(e, "errors", None)
    if callable(errors) and type(e).__name__ == "ValidationError":
        first = errors()[0]
        return f"{'.'.join(map(str, first['loc'])) or 'settings'}: {first['msg']}"
    return str(e).splitlines()[0] if str(e) else type(e).__name__
