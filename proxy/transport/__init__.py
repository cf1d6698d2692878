"""HTTP/1.1 to upstreams: a keep-alive pool and one lean connection protocol.

Bytes only: no energy, no dialects. `proxy.forward` drives it.
"""

from proxy.transport.connection import Connection, ConnectFailed, ConnectTimeout, FirstByteTimeout, IdleTimeout, TransportError
from proxy.transport.pool import Origin, Pool, origin_of

__all__ = ["Connection", "ConnectFailed", "ConnectTimeout", "FirstByteTimeout", "IdleTimeout", "Origin", "Pool", "TransportError", "origin_of"]
