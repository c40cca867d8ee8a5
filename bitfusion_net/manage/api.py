"""``/api/v1/``: the server's state as JSON documents (docs/OBSERVABILITY.md, "JSON API").

The documents extend what SERVER_INFO answers on the data connection (``Server.info``,
``gpus``, ``reservations``), so the CLI and the dashboards read one source of truth.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .history import History

if TYPE_CHECKING:
    from ..server.server import Server

LAG_WARN_S = 0.1  # the event loop answering this late is worth a look
LAG_FAIL_S = 1.0  # this late, clients time out


class NotFound(Exception):
    """No such document (404)."""


class Api:
    """Builds the documents of one server."""

    def __init__(self, server: Server, history: History, management: str, pool: list[str]):
        self._server = server
        self._history = history
        self._management = management
        self._pool = pool
        self._routes: dict[str, Callable[[dict[str, str]], dict[str, Any]]] = {
            "server": self.server,
            "gpus": self.gpus,
            "leases": self.leases,
            "tenants": self.tenants,
            "health": self.health,
            "history": self.history,
            "pool": self.pool,
        }

    def get(self, path: str, query: dict[str, str]) -> dict[str, Any]:
        """The document at ``path`` (after ``/api/v1/``); ``NotFound``, ``ValueError``."""
        name, _, rest = path.partition("/")
        if name == "leases" and rest:
            return self.lease(rest)
        route = self._routes.get(name)
        if route is None or rest:
            raise NotFound(f"no document {path!r}; there are {', '.join(sorted(self._routes))}")
        return route(query)

    def server(self, query: dict[str, str] | None = None) -> dict[str, Any]:
        server = self._server
        info = server.info()
        info.update(
            management=self._management,
            uptime=round(time.time() - info["started"], 3),
            connections=server.connection_count(),
            tokens_required=server.tokens_required,
        )
        return {"server": info}

    def gpus(self, query: dict[str, str] | None = None) -> dict[str, Any]:
        utilisation = self._history.gpu_utilisation
        gpus = self._server.gpus()
        for gpu in gpus:
            index = gpu["gpu"]
            gpu["uuid"] = self._server.gpu_uuid(index)
            gpu["utilisation"] = utilisation[index] if index < len(utilisation) else None
        return {"gpus": gpus}

    def _leases(self) -> list[dict[str, Any]]:
        users = {r.id: r.user.user if r.user else None for r in self._server.live_reservations()}
        shares = self._history.lease_utilisation
        leases = self._server.reservations()
        for lease in leases:
            lease["user"] = users.get(lease["id"])
            used = shares.get(lease["id"])
            for index, device in enumerate(lease["devices"]):
                device["utilisation"] = used[index] if used and index < len(used) else None
        return leases

    def leases(self, query: dict[str, str] | None = None) -> dict[str, Any]:
        return {"leases": self._leases()}

    def lease(self, lease_id: str) -> dict[str, Any]:
        for lease in self._leases():
            if str(lease["id"]) == lease_id:
                return {"lease": lease}
        raise NotFound(f"no lease {lease_id} on this server (it may have ended)")

    def tenants(self, query: dict[str, str] | None = None) -> dict[str, Any]:
        return {"tenants": self._server.sessions()}

    def history(self, query: dict[str, str]) -> dict[str, Any]:
        since = query.get("since", "0")
        try:
            after = float(since)
        except ValueError:
            raise ValueError(f"since must be a Unix time in seconds, got {since!r}") from None
        return {"interval": self._history.interval, "samples": self._history.since(after)}

    def pool(self, query: dict[str, str] | None = None) -> dict[str, Any]:
        servers = [self._management, *(url for url in self._pool if url != self._management)]
        return {"servers": servers}

    def health(self, query: dict[str, str] | None = None) -> dict[str, Any]:
        """The server's own checks; ``status`` is the worst of theirs."""
        checks = [self._check_executors(), self._check_lag(), self._check_memory()]
        if self._server.tokens_required:
            checks.append(self._check_tokens())
        order = ["pass", "warn", "fail"]
        worst = max((c["status"] for c in checks), key=order.index)
        return {"status": worst, "checks": checks}

    def ready(self) -> tuple[bool, str]:
        """Whether every executor takes work (``/readyz``), and what is wrong if not."""
        check = self._check_executors()
        return check["status"] == "pass", check["detail"]

    def _check_executors(self) -> dict[str, str]:
        executors = self._server.executors()
        down = [str(i) for i, e in enumerate(executors) if not e.alive()]
        if not executors:
            return _check("executors", "fail", "no executor is running (is the server starting?)")
        if down:
            return _check("executors", "fail", f"the worker of gpu {', '.join(down)} has stopped")
        kinds = sorted({e.properties.executor for e in executors})
        return _check("executors", "pass", f"{len(executors)} {'/'.join(kinds)} device(s) running")

    def _check_lag(self) -> dict[str, str]:
        lag = self._history.lag
        status = "fail" if lag > LAG_FAIL_S else "warn" if lag > LAG_WARN_S else "pass"
        return _check("event_loop", status, f"the event loop answered {lag * 1e3:.1f} ms late")

    def _check_memory(self) -> dict[str, str]:
        over = [
            f"gpu{g['gpu']}"
            for g in self._server.gpus()
            if g["leased_memory"] > g["total_memory"] or g["memory_used"] > g["total_memory"]
        ]
        if over:
            return _check("memory", "fail", f"more memory promised than present on {over}")
        return _check("memory", "pass", "memory promised to leases fits every GPU")

    def _check_tokens(self) -> dict[str, str]:
        try:
            count = self._server.token_count()
        except Exception as exc:  # noqa: BLE001 - any failure to read it is the finding
            return _check("tokens", "fail", f"the token store cannot be read: {exc}")
        return _check("tokens", "pass", f"{count} token(s) in the store")


def _check(name: str, status: str, detail: str) -> dict[str, str]:
    return {"name": name, "status": status, "detail": detail}
