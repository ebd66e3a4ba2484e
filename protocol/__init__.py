"""The TSQP wire protocol shared by gpu-server and tee-client (see protocol.wire)."""

from protocol.wire import PROTOCOL_VERSION

__all__ = ["PROTOCOL_VERSION"]
