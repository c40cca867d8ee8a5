"""Back-pressure of one session: when the server stops reading a client, and when it resumes.

The server stops reading a connection while the session's payload bytes held in host memory
exceed its staging budget, while its send queue is full, or while one of its leases has more than
``MAX_QUEUED_OPERATIONS`` operations queued on its GPU, until that queue is down to half
(docs/PROTOCOL.md, section 10). TCP flow control then slows the client.
"""

from __future__ import annotations

# Operations one lease may have queued on its GPU before the session stops reading (each costs a
# few hundred bytes of server memory; far more than any pipeline needs to keep a GPU busy).
MAX_QUEUED_OPERATIONS = 10_000
RESUME_QUEUED_OPERATIONS = MAX_QUEUED_OPERATIONS // 2
BACKLOG_POLL_S = 0.002  # queued operations finish on the device, which tells nobody: look again
# How often the server checks that the clients of sessions it is not reading, or that have work
# queued, are still there (and writes them a KEEPALIVE): a dead client's GPUs come back within
# about two periods.
PROBE_PERIOD_S = 0.25
# Reading the leases' queue depths takes a lock per lease: it is done every this many
# submissions, not on every frame, so the bound may be overshot by this many operations.
QUEUE_CHECK_EVERY = 64


class SessionFlow:
    """The counters and thresholds; the session asks ``should_read`` after every change."""

    def __init__(self, staging_budget: int) -> None:
        self.staged = 0  # payload bytes in host memory: copies in not yet run, copies out unsent
        self.staging_budget = staging_budget
        self.backlogged = False  # paused for queued operations, until they are down to half
        self.unchecked = 0  # operations submitted since the queue depths were last read

    def depths_due(self) -> bool:
        """Whether to read the queue depths now (else they count as short: only a backlog, or
        QUEUE_CHECK_EVERY submissions, can have changed the answer)."""
        if self.backlogged or self.unchecked >= QUEUE_CHECK_EVERY:
            self.unchecked = 0
            return True
        return False

    def should_read(self, writable: bool, most_queued: int) -> bool:
        """Whether to read more, given the send queue's state and the longest lease queue."""
        if self.backlogged:
            self.backlogged = most_queued > RESUME_QUEUED_OPERATIONS
        else:
            self.backlogged = most_queued > MAX_QUEUED_OPERATIONS
        return writable and not self.backlogged and self.staged <= self.staging_budget
