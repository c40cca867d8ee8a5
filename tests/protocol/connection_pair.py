"""A client and a server connection talking in memory, with no I/O (h11's ``ConnectionPair``).

Bytes each side produces are handed to the other by the test, so every rule of the conversation
can be checked step by step, without sockets or an event loop.
"""

from __future__ import annotations

from typing import Any

from bitfusion_net.protocol import (
    ClientConnection,
    DeviceGrant,
    RequestReceived,
    ServerConnection,
)
from bitfusion_net.protocol import messages as m

GRANT = DeviceGrant(0, 0, 2**30, 2**29, 0.5, 0.5, m.MODE_SHARE, "NumPy reference device", "numpy")


class ConnectionPair:
    def __init__(self) -> None:
        self.client = ClientConnection()
        self.server = ServerConnection()

    def client_sends(self, message: m.Request, payload: bytes = b"", **kwargs: Any) -> int:
        request_id, head = self.client.send_request(message, len(payload), **kwargs)
        self.server.receive_data(head + payload)
        return request_id

    def server_events(self) -> list[Any]:
        events = []
        while (event := self.server.next_event()) is not None:
            events.append(event)
        return events

    def client_receives(self, data: bytes) -> list[Any]:
        self.client.receive_data(data)
        events = []
        while (event := self.client.next_event()) is not None:
            events.append(event)
        return events

    def handshake(self) -> m.HelloReply:
        """HELLO, delivered and accepted; both ends are then ready."""
        self.client_sends(m.Hello(1, 0.5, 0, "pair"), token="hello")
        (hello,) = self.server_events()
        assert isinstance(hello, RequestReceived)
        reply = m.HelloReply.with_devices(1, 2**26, 2**16, [GRANT])
        (answered,) = self.client_receives(self.server.accept(hello.request_id, reply))
        assert answered.token == "hello"
        return reply
