"""Every error this service raises on purpose, on either side, and how errors cross the wire.

`TSQPError` is the one root: the three CLIs catch it (one clear line, exit 1), and anything
else is a bug that keeps its traceback. A server never dies on a bad request: it replies
{"ok": false, "error": {"type", "message"}} with `type` the class name of one of the
`WIRE_ERRORS` below, and the client re-raises the same class (`from_reply`).
"""


class TSQPError(Exception):
    """Base class of every error this service raises on purpose."""


class UsageError(TSQPError):
    """A setting, flag or file given by the user cannot be used."""


class CheckpointError(TSQPError):
    """The model path does not hold a loadable Llama checkpoint."""


class EndpointBusy(TSQPError):
    """Another server holds the endpoint, or it cannot be bound."""


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


class RegionGone(BadRequest):
    """The request names a shared-memory region this server does not hold (dropped, or a restarted server)."""


class ModelMismatch(TSQPError):
    """The server holds a different model than the one this client initialised with."""


class ServerUnavailable(TSQPError):
    """Nothing answered at the endpoint within the deadline, after every retry."""


class ServerStopping(ServerUnavailable):
    """The server is shutting down and will not answer this request."""


class BadReply(TSQPError):
    """A reply that does not hold what its request asks for (tensor count, shapes, dtypes): a broken or hostile
    server. Raised by the client; never sent."""


class RemoteError(TSQPError):
    """The server failed in a way it does not name (an internal error, or a type this side does not know)."""


WIRE_ERRORS = {
    cls.__name__: cls
    for cls in (
        BadRequest,
        VersionMismatch,
        UnknownMethod,
        UnknownModule,
        BadShape,
        TooLarge,
        RegionGone,
        ModelMismatch,
        ServerStopping,
    )
}


def from_reply(type_name: str, message: str) -> TSQPError:
    """The error a reply names, as its own class (RemoteError for any other type)."""
    cls = WIRE_ERRORS.get(type_name)
    return cls(message) if cls else RemoteError(f"{type_name}: {message}")


def describe(e: Exception) -> str:
    """One line for a user: no traceback, the first validation problem, or the message."""
    errors = getattr(e, "errors", None)
    if callable(errors) and type(e).__name__ == "ValidationError":
        first = errors()[0]
        return f"{'.'.join(map(str, first['loc'])) or 'settings'}: {first['msg']}"
    return str(e).splitlines()[0] if str(e) else type(e).__name__
