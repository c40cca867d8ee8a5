"""Who may connect: the token a connection presents (AUTHENTICATE), checked against the store.

A server with a token store requires a token on every connection; one without accepts anyone,
which ``Server`` allows only on loopback unless the operator says ``insecure``. Failed attempts
are limited per source address: after ``MAX_FAILURES`` within ``FAILURE_WINDOW_S`` seconds, that
address is refused without a look at the store until the window has passed, so guessing is slow
and costs the server nothing. Every accept and refusal is logged with the user and the address.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from ..protocol import AuthenticationError
from .tokens import TokenError, TokenRecord, TokenStore

log = logging.getLogger(__name__)

MAX_FAILURES = 5
FAILURE_WINDOW_S = 60.0
MAX_TRACKED_HOSTS = 10_000  # addresses with recent failures kept; the oldest go first
HOW_TO_GET_ONE = (  # the client's ways of giving it: client.session and cli.config
    "this server requires a token: ask its operator for one (bitfusion-server token create) "
    "and give it to connect(token=...), $BITFUSION_NET_TOKEN or 'token:' in client.yaml"
)


@dataclass
class Gatekeeper:
    """The server's admission policy; used on the event loop only."""

    store: TokenStore | None  # None: no tokens, everyone is anonymous
    _failures: dict[str, deque[float]] = field(default_factory=dict)

    @property
    def required(self) -> bool:
        return self.store is not None

    def authenticate(self, token: str, host: str, now: float | None = None) -> TokenRecord | None:
        """The token's record (None on a server without tokens), or ``AuthenticationError``."""
        if self.store is None:
            log.info("%s: a token was given; this server does not use tokens", host)
            return None
        now = time.monotonic() if now is None else now
        failures = self._failures.get(host)
        if failures is not None:
            while failures and failures[0] <= now - FAILURE_WINDOW_S:
                failures.popleft()
            if not failures:
                del self._failures[host]
            elif len(failures) >= MAX_FAILURES:
                wait = failures[0] + FAILURE_WINDOW_S - now
                log.warning("%s: refused, %d failed attempts (rate limited)", host, len(failures))
                raise AuthenticationError(
                    f"too many failed attempts from {host}; try again in {wait:.0f} s"
                )
        try:
            record = self.store.check(token)
        except TokenError as exc:
            self._note_failure(host, now)
            log.warning("%s: token refused: %s", host, exc)
            raise AuthenticationError(f"token refused: {exc}") from None
        # A success does not clear the address's failures: a valid token must not buy guesses.
        log.info("%s: authenticated as %s (token %s)", host, record.user, record.id)
        return record

    def _note_failure(self, host: str, now: float) -> None:
        failures = self._failures.pop(host, None) or deque()
        failures.append(now)
        self._failures[host] = failures  # re-inserted: the dict keeps the latest last
        while len(self._failures) > MAX_TRACKED_HOSTS:
            del self._failures[next(iter(self._failures))]

    def by_certificate(self, name: str, host: str) -> TokenRecord | None:
        """Mutual TLS: the user a verified client certificate names (its commonName) stands for
        that user's newest live token, whose limits then hold; None if they have none."""
        if self.store is None:
            return None
        now = time.time()
        live = [r for r in self.store.records() if r.user == name and r.state(now) == "live"]
        if not live:
            log.warning("%s: certificate of %r, who has no live token", host, name)
            return None
        record = max(live, key=lambda r: r.created)
        log.info("%s: authenticated as %s by certificate (token %s)", host, name, record.id)
        return record

    def ended_tokens(self, ids: set[str]) -> dict[str, str]:
        """Of the token ids in use, those no longer live (revoked or expired), with why."""
        if self.store is None or not ids:
            return {}
        now = time.time()
        ended = {}
        for record in self.store.records():
            if record.id in ids and record.state(now) != "live":
                ended[record.id] = f"the token of {record.user} was {record.state(now)}"
        return ended
