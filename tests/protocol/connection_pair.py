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
SECRET = bytes(range(32))
SERVER_ID = "0b7d2c6e-5f1a-4e8b-9c3d-2a6f1e0d9b47"


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

    def authenticate(self, token: str = "bfnet-token", user: str = "alice") -> m.AuthenticateReply:
        """AUTHENTICATE sent, delivered and answered with ``user``; both ends then expect the
        opening request (a greeting or a control request), as on a fresh connection."""
        self.client_sends(m.Authenticate(token), token="auth")
        (received,) = self.server_events()
        assert isinstance(received, RequestReceived) and received.message == m.Authenticate(token)
        reply = m.AuthenticateReply(user)
        (answered,) = self.client_receives(
            self.server.reply(m.Opcode.AUTHENTICATE, received.request_id, reply)
        )
        assert answered.token == "auth" and answered.message == reply
        return reply

    def handshake(self, greeting: m.Request | None = None) -> m.HelloReply:
        """HELLO (or ``greeting``, an ATTACH), delivered and accepted; both ends are then ready."""
        greeting = greeting or m.Hello(1, 0.5, 0, "pair")
        self.client_sends(greeting, token="hello")
        (hello,) = self.server_events()
        assert isinstance(hello, RequestReceived) and hello.message == greeting
        reply = m.HelloReply.with_devices(1, 2**26, 2**16, [GRANT])
        accepted = self.server.accept(hello.request_id, reply)
        (answered,) = self.client_receives(accepted)
        assert answered.token == "hello"
        return reply

    def attach(self) -> m.HelloReply:
        """An ATTACH to reservation 3, delivered and accepted; both ends are then ready."""
        return self.handshake(m.Attach(3, SECRET, SERVER_ID, "pair"))

    def control(self, first: m.Request | None = None) -> RequestReceived:
        """A control connection: ``first`` (SERVER_INFO by default) sent and delivered, not yet
        answered; returns what the server received."""
        first = first or m.ServerInfo(m.INFO_BRIEF)
        self.client_sends(first, token="first")
        (received,) = self.server_events()
        assert isinstance(received, RequestReceived) and received.message == first
        return received
