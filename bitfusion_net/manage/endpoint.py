"""The management endpoint: health, Prometheus metrics, the JSON API and the dashboards, on an
address of their own (docs/OBSERVABILITY.md).

Who may read what: ``/healthz``, ``/readyz`` and the dashboards' static files are open; the
JSON API and ``/metrics`` need an operator's token when the server has a token store
(``/metrics`` may be opened with ``open_metrics``). A token is admitted (logged, and failures
rate-limited per address) the first time it is seen, then checked again quietly against the store
at most once a second, so a dashboard polling every second costs the store little and a revoked
token stops working within a second.
"""

from __future__ import annotations

import json
import logging
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..protocol import BitfusionError
from ..server.tokens import TokenError
from ..transport import ServerTls
from .api import Api, NotFound
from .history import History
from .http import HttpServer, Request, Response
from .metrics import ServerCollector

if TYPE_CHECKING:
    from ..server.auth import Gatekeeper
    from ..server.server import Server
    from ..server.tokens import TokenRecord

log = logging.getLogger(__name__)

TOKEN_RECHECK_S = 1.0
_STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
_CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Headers": "Authorization",
    "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS",
    "Access-Control-Max-Age": "600",
}


def parse_manage_address(text: str) -> tuple[str, str, int]:
    """``http://HOST:PORT`` or ``https://HOST:PORT`` -> (scheme, host, port)."""
    scheme, sep, rest = text.partition("://")
    host, colon, port = rest.rpartition(":")
    if not sep or scheme not in ("http", "https") or not colon or not host or "/" in rest:
        raise ValueError(
            f"a management address is http://HOST:PORT or https://HOST:PORT, got {text!r}"
        )
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"bad port in management address {text!r}") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"port out of range in management address {text!r}")
    return scheme, host.strip("[]"), number


class ManagementEndpoint:
    """Serves one ``Server``'s management endpoint."""

    def __init__(
        self,
        server: Server,
        gate: Gatekeeper,
        address: str,
        *,
        pool: list[str] | None = None,
        open_metrics: bool = False,
        tls: ServerTls | None = None,
    ) -> None:
        self._scheme, self._host, self._port = parse_manage_address(address)
        if self._scheme == "https" and tls is None:
            raise ValueError(f"{address} needs a certificate: give the server's TLS (--tls-cert)")
        self._server = server
        self._gate = gate
        self._pool = list(pool or [])
        self._open_metrics = open_metrics
        # The server's certificate, without its client CA: browsers bring tokens, not certificates.
        context = (
            ServerTls(tls.cert_file, tls.key_file).context()
            if tls and self._scheme == "https"
            else None
        )
        self.history = History(server)
        self._registry = CollectorRegistry(auto_describe=False)
        self._http = HttpServer(self._answer, context)
        self._checked: dict[str, tuple[float, TokenRecord | None]] = {}  # token -> (when, whose)
        self._api: Api | None = None
        self.address = ""

    async def start(self) -> None:
        try:
            host, port = await self._http.start(self._host, self._port)
        except OSError as exc:
            where = f"{self._scheme}://{self._host}:{self._port}"
            reason = exc.strerror or str(exc)
            raise OSError(f"cannot serve the management endpoint on {where}: {reason}") from None
        shown = f"[{host}]" if ":" in host else host
        self.address = f"{self._scheme}://{shown}:{port}"
        self._api = Api(self._server, self.history, self.address, self._pool)
        self._registry.register(ServerCollector(self._server, self.history))
        self.history.start()
        log.info("management endpoint on %s (dashboards at /, metrics at /metrics)", self.address)

    async def close(self) -> None:
        self.history.stop()
        await self._http.close()

    # -- answering -------------------------------------------------------------------------------
    def _answer(self, request: Request) -> Response:
        path = request.path
        if request.method == "OPTIONS":
            return Response(204, headers=dict(_CORS))
        if path == "/healthz":
            return Response(200, b"ok\n")
        if path == "/readyz":
            assert self._api is not None
            ready, detail = self._api.ready()
            return Response(200 if ready else 503, (("ready" if ready else detail) + "\n").encode())
        if path in ("/", "/index.html"):
            return self._static("index.html")
        if path.startswith("/static/"):
            return self._static(path.removeprefix("/static/"))
        if path == "/metrics":
            if not self._open_metrics:
                refused = self._authorise(request)
                if refused is not None:
                    return refused
            return Response(200, generate_latest(self._registry), CONTENT_TYPE_LATEST)
        if path.startswith("/api/v1/"):
            return self._json_api(request)
        return _json(404, {"error": f"nothing at {path}; the dashboards are at /"})

    def _json_api(self, request: Request) -> Response:
        refused = self._authorise(request)
        if refused is not None:
            return refused
        assert self._api is not None
        try:
            document = self._api.get(request.path.removeprefix("/api/v1/"), request.query)
        except NotFound as exc:
            return _json(404, {"error": str(exc)})
        except ValueError as exc:
            return _json(400, {"error": str(exc)})
        return _json(200, document)

    def _authorise(self, request: Request) -> Response | None:
        """None if the request may read the API; else the 401 or 403 answer."""
        if not self._gate.required:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _json(
                401,
                {"error": "this endpoint needs an operator's token: Authorization: Bearer TOKEN "
                 "(bitfusion-server token create --user NAME --operator)"},
                {"WWW-Authenticate": 'Bearer realm="bitfusion-net"'},
            )  # fmt: skip
        token = token.strip()
        now = time.monotonic()
        checked = self._checked.get(token)
        if checked is not None and now - checked[0] > TOKEN_RECHECK_S:
            assert self._gate.store is not None
            try:
                checked = self._checked[token] = (now, self._gate.store.check(token))
            except TokenError:
                checked = self._checked.pop(token, None)  # admitted anew (and logged) below
        if checked is None:
            host = request.peer.rpartition(":")[0] or request.peer
            try:
                record = self._gate.authenticate(token, host)
            except BitfusionError as exc:
                return _json(401, {"error": exc.message}, {"WWW-Authenticate": "Bearer"})
            if len(self._checked) > 1024:  # tokens seen lately; a flood of them must not grow it
                self._checked.clear()
            checked = self._checked[token] = (now, record)
        record = checked[1]
        if record is not None and not record.operator:
            return _json(
                403,
                {"error": f"the token of {record.user} is not an operator's; the management "
                 "API needs one (bitfusion-server token create --user NAME --operator)"},
            )  # fmt: skip
        return None

    @staticmethod
    def _static(name: str) -> Response:
        suffix = name[name.rfind(".") :] if "." in name else ""
        if "/" in name or name.startswith(".") or suffix not in _STATIC_TYPES:
            return _json(404, {"error": f"no file {name!r}"})
        try:
            body = resources.files(__package__).joinpath("static", name).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            return _json(404, {"error": f"no file {name!r}"})
        headers = {
            "Content-Security-Policy": "default-src 'self'; connect-src *; img-src 'self' data:"
        }
        return Response(200, body, _STATIC_TYPES[suffix], headers)


def _json(status: int, document: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(document, separators=(",", ":")).encode()
    return Response(status, body, "application/json", {**_CORS, **(headers or {})})
