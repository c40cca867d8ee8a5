"""ReservationTable on an injected clock: what a simulation (perf/utilisation.py) relies on."""

from __future__ import annotations

import time

from bitfusion_net.protocol import messages as m
from bitfusion_net.server.leases import GpuPool, GpuSlot
from bitfusion_net.server.reservations import EndedBy, Reservation, ReservationTable

GiB = 2**30


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Program:
    """An attached program as the table sees one (``reservations.Attachment``)."""

    def __init__(self, ident: int, last: float, busy: bool = False) -> None:
        self.id = ident
        self.last = last
        self.is_busy = busy
        self.told: list[str] = []

    def lease_ended(self, reason: str) -> None:
        self.told.append(reason)

    def last_request(self) -> float:
        return self.last

    def busy(self) -> bool:
        return self.is_busy


def table_on(clock: FakeClock, gpus: int = 2) -> ReservationTable:
    pool = GpuPool([GpuSlot(i, 16 * GiB) for i in range(gpus)])
    return ReservationTable(pool, [], "test", 0.0, clock=clock)


def reserve(table: ReservationTable, fraction: float, idle_timeout: float) -> Reservation:
    return table.reserve(1, fraction, 0, 0.0, m.MODE_SHARE, "t", None, idle_timeout=idle_timeout)


def test_the_default_clock_is_monotonic() -> None:
    table = ReservationTable(GpuPool([GpuSlot(0, GiB)]), [], "test", 0.0)
    assert table.clock is time.monotonic
    before = time.monotonic()
    reservation = reserve(table, 0.5, 0.0)
    assert before <= reservation.created <= time.monotonic()


def test_a_reservation_is_stamped_by_the_tables_clock() -> None:
    clock = FakeClock(1000.0)
    reservation = reserve(table_on(clock), 0.5, 0.0)
    assert reservation.created == reservation.last_active == 1000.0


def test_idle_release_runs_on_the_injected_clock() -> None:
    clock = FakeClock(50.0)
    table = table_on(clock)
    ended: list[Reservation] = []
    table.end_listeners.append(ended.append)
    reservation = reserve(table, 0.5, idle_timeout=10.0)
    table.sweep(59.0)  # idle 9 s of 10: kept
    assert reservation.ended is None and len(table) == 1
    table.sweep(60.5)
    assert reservation.ended is not None and "idle" in reservation.ended
    assert table.ended_by[EndedBy.IDLE_TIMEOUT.value] == 1
    assert ended == [reservation]
    assert all(slot.leased_share == 0 and slot.tenants == 0 for slot in table.pool.slots)


def test_an_attached_program_keeps_its_reservation_while_busy_or_calling() -> None:
    clock = FakeClock(0.0)
    table = table_on(clock)
    reservation = reserve(table, 0.25, idle_timeout=10.0)
    program = Program(7, last=0.0, busy=True)
    reservation.attached[program] = []  # a program with no executor tenants, as the sim has
    table.sweep(100.0)  # busy: not idle, and its activity is recorded now
    assert reservation.ended is None and reservation.last_active == 100.0
    program.is_busy, program.last = False, 105.0
    table.sweep(114.0)  # last call 9 s ago
    assert reservation.ended is None
    table.sweep(115.5)
    assert reservation.ended is not None
    assert program.told and "idle" in program.told[0]


def test_detach_stamps_the_tables_clock_and_needs_no_event_loop_without_tenants() -> None:
    clock = FakeClock(10.0)
    table = table_on(clock)
    reservation = reserve(table, 0.5, idle_timeout=0.0)
    program = Program(1, last=10.0)
    reservation.attached[program] = []
    clock.now = 42.0
    table.detach(reservation, program)  # no running event loop here: nothing to close
    assert reservation.last_active == 42.0 and not reservation.attached
    table.end(reservation, "done", EndedBy.RELEASED)
    assert reservation.returned and table.pool.slots[reservation.placements[0].gpu].tenants == 0
    assert program.told == []  # it had detached: nobody to tell
