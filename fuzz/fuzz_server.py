#!/usr/bin/env python3
"""Fuzz target: a real ``ServerSession`` fed fuzzer bytes, end to end, without sockets.

Run it for real (an hour, say, from the repository root; new inputs go into the corpus):

    python fuzz/fuzz_server.py -max_total_time=3600 -timeout=20 fuzz/corpus/server

and in CI for seconds (``tests/fuzz/test_fuzz_smoke.py`` does this on a copy of the corpus):

    python fuzz/fuzz_server.py -max_total_time=8 -timeout=20 COPY_OF_CORPUS

Replay one input without fuzzing: ``python fuzz/fuzz_server.py FILE``.

Each input gets its own event loop, its own two NumPy devices (``create_executors``), its own
``GpuPool`` and ``ReservationTable``, built as ``Server.start`` builds them, so that device
pointers and handles are the same on every run of an input (the first allocation is always at
0x0200_0000_0000_0000). The session is one end of ``memory_stream_pair``; the harness is the other
end. The input:

- byte 0: bit 0 write the harness's greeting first (so the fuzzer starts past it); bit 1 linger:
  wait until every request that wants a reply has one (or the server closed) before closing;
  bit 2 abort the connection rather than close it; bit 3 call ``probe()`` while lingering
  (KEEPALIVE); bit 4 call ``close_if_stalled`` as if long after, before closing; bit 5 make the
  devices infinitely fast (``_make_instant``: races with the worker thread become deterministic);
  bit 6 reserve half of GPU 0 before the session starts, as reservation 1 with the secret
  ``WAITING_SECRET`` (so that an ATTACH can find it, and a RELEASE end it); bit 7 sweep the
  reservations as if long after, before closing (idle timeouts end them: LEASE_ENDED).
- byte 1: bits 0-6 which greeting (``HELLOS``, an ATTACH among them); bit 7 write an
  AUTHENTICATE (request id ``AUTH_ID``) before everything else, the harness's greeting included:
  the server has no token store, so it must answer with an empty user and go on (PROTOCOL.md
  5.7.1); byte 2: the stream's piece size (``CHUNKS``); byte 3: the server's ``max_payload``
  (``PAYLOAD_LIMITS``); the rest: the bytes the client writes.

What must hold: nothing raises out of the session (the loop's exception handler sees nothing);
nothing of ``bitfusion_net``, ``executors`` or ``asyncio`` logs at ERROR or above (an internal
error); every byte the server writes decodes as reply frames, none an INTERNAL error; each reply
answers a request that was sent (by id and opcode; a deferred error names a no-reply request; a
KEEPALIVE has id 0), an AuthenticateReply answers only a first request and names no user (no
tokens here), a HELLO (or ATTACH) reply comes first (after that one, if any) and grants what
was asked, a fatal
ERROR is the last frame, one device's answers come in request order (section 8), a deferred error is an
earlier no-reply request's on the same device, and a copy's payload is as long as asked; when the harness lingers, every request that wants a reply gets one within
``BOUND_S`` (or the server closes the connection); and once the stream is closed the session is
closed exactly once and holds no lease; the only reservations left are ones held by no
connection (``HOLD_BY_IDLE_TIMEOUT``); and once those are ended too, every lease is back in the
pool within ``BOUND_S``.

``FUZZ_AVOID`` names (see fuzz_support), each letting a known bug go unreported (no input can
steer clear of them): ``get-buffer-after-error``, a ``ProtocolError`` raised by the session's
``get_buffer`` into the transport; ``query-overtakes-reply``, a query answered on the loop before
the reply to an earlier request of its device.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # Fuzzing: the project's modules are instrumented for coverage as they are imported here; the
    # imports below then find them loaded. Replaying (tests) imports them plainly.
    import atheris

    with atheris.instrument_imports(include=["bitfusion_net", "executors"]):
        import bitfusion_net.protocol  # noqa: F401
        import bitfusion_net.server.session  # noqa: F401
        import executors  # noqa: F401

import asyncio  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

from fuzz_support import Choices, InvariantBroken, avoiding, check, trace  # noqa: E402

import executors.builtins  # noqa: E402
import executors.numpy_device  # noqa: E402
from bitfusion_net.protocol import (  # noqa: E402
    ERROR_DEFERRED,
    ERROR_FATAL,
    PROTOCOL_VERSION,
    RULES,
    ErrorCode,
    ErrorReply,
    Frame,
    FrameDecoder,
    Limits,
    Opcode,
    ProtocolError,
    encode_request,
)
from bitfusion_net.protocol import messages as m  # noqa: E402
from bitfusion_net.server.leases import SHARE_UNITS, GpuPool, GpuSlot  # noqa: E402
from bitfusion_net.server.reservations import ReservationTable  # noqa: E402
from bitfusion_net.server.session import ServerSession  # noqa: E402
from bitfusion_net.transport import memory_stream_pair  # noqa: E402
from executors import Executor, Tenant, create_executors  # noqa: E402
from executors.base import Completion  # noqa: E402
from executors.worker import DeviceWorker  # noqa: E402

DEVICES = 2  # so that a HELLO can lease two GPUs
DEVICE_MEMORY = 16 * 2**20  # small: a memset of all of it is quick, and it is quickly exhausted
MIN_SHARE = round(0.05 * SHARE_UNITS)  # the server's default smallest slice
BOUND_S = 3.0  # the most answering, closing or releasing may take before it counts as a hang
SERVER_ID = "00000000-0000-4000-8000-000000000000"  # the fuzzed server's instance id
WAITING_SECRET = bytes(32)  # the secret of the reservation bit 6 makes
MAX_IDLE_TIMEOUT = 60.0
HELLOS = (  # the greetings byte 1 chooses from
    m.Hello(1, 1.0, 0, "fuzz"),
    m.Hello(2, 0.5, 0),
    m.Hello(1, 0.0, 2**20, weight=10.0),
    m.Hello(1, 0.25, 0, mode=m.MODE_CAP),
    m.Hello(2, 0.05, 0),
    m.Hello(1, 0.01, 0),  # below the smallest slice: refused
    m.Hello(3, 1.0, 0),  # more GPUs than there are: refused
    m.Hello(1, 0.0, 2**40),  # more memory than a device has: refused
    m.Attach(1, WAITING_SECRET, SERVER_ID, "fuzz"),  # the reservation of bit 6 (refused without)
)
AUTH_ID = 2**32 - 1  # the request id of the harness's AUTHENTICATE (its greeting is #1)
TOKEN = "bfnet_0123456789abcdef_" + "A" * 43  # any token: this server does not use tokens
WITH_AUTHENTICATE = 0x80  # in byte 1
CHUNKS = (1 << 20, 1, 3, 24, 64, 4096)
PAYLOAD_LIMITS = (4096, 256, 1024, 65536)
WATCHED_LOGGERS = ("bitfusion_net", "executors", "asyncio")


class ErrorRecords(logging.Handler):
    """Keeps every ERROR-level record of the watched loggers: each one is a server bug."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _harnessed() -> Iterator[ErrorRecords]:
    """For one input: the ERROR records of the watched loggers, and two shortcuts, all undone
    after it (a test run that replays inputs must not leave them behind for other tests)."""
    records = ErrorRecords()
    loggers = [logging.getLogger(name) for name in WATCHED_LOGGERS]
    busy_max, free_heap = executors.builtins.BUSY_MAX_US, executors.numpy_device.return_free_heap
    for logger in loggers:
        logger.addHandler(records)
    # A ``busy`` kernel may legitimately hold a device for 10 s, which would read as a hang here
    # and slow the fuzzer to a crawl; its limit is only a number, so it is lowered to 20 ms.
    executors.builtins.BUSY_MAX_US = 20_000
    # A device whose last tenant leaves runs gc.collect() and malloc_trim() to give memory back
    # to the system: 10-20 ms, on every input here, for nothing the protocol can tell.
    executors.numpy_device.return_free_heap = lambda: None
    try:
        yield records
    finally:
        for logger in loggers:
            logger.removeHandler(records)
        executors.builtins.BUSY_MAX_US = busy_max
        executors.numpy_device.return_free_heap = free_heap


@dataclass
class Config:
    send_hello: bool
    authenticate: bool
    linger: bool
    abort: bool
    probe: bool
    stall: bool
    instant: bool
    waiting: bool
    sweep: bool
    hello: m.Request
    chunk: int
    limits: Limits

    @classmethod
    def read(cls, choices: Choices) -> Config:
        bits = choices.byte()
        greeting = choices.byte()
        return cls(
            send_hello=bool(bits & 1),
            authenticate=bool(greeting & WITH_AUTHENTICATE),
            linger=bool(bits & 2),
            abort=bool(bits & 4),
            probe=bool(bits & 8),
            stall=bool(bits & 16),
            instant=bool(bits & 32),
            waiting=bool(bits & 64),
            sweep=bool(bits & 128),
            hello=HELLOS[(greeting & ~WITH_AUTHENTICATE) % len(HELLOS)],
            chunk=CHUNKS[choices.byte() % len(CHUNKS)],
            limits=Limits(max_payload=PAYLOAD_LIMITS[choices.byte() % len(PAYLOAD_LIMITS)]),
        )


@dataclass
class Requests:
    """What the client wrote, decoded as the server would (up to the first protocol error)."""

    frames: list[Frame] = field(default_factory=list)

    @classmethod
    def of(cls, data: bytes, limits: Limits) -> Requests:
        decoder = FrameDecoder(receives_replies=False, limits=limits)
        try:
            decoder.receive_data(data)
        except ProtocolError:
            pass  # the server fails there too and closes the connection
        out = cls()
        while (frame := decoder.next_frame()) is not None:
            out.frames.append(frame)
        return out

    @property
    def wanting_replies(self) -> int:
        return sum(1 for frame in self.frames if RULES[frame.opcode].reply is not None)


class Peer:
    """The client's end of the stream: takes every byte and decodes it as replies."""

    def __init__(self, limits: Limits) -> None:
        self._buffer = bytearray(64 * 1024)
        self._decoder = FrameDecoder(
            receives_replies=True, limits=Limits(max_payload=limits.max_payload)
        )
        self.frames: list[Frame] = []
        self.broken: str | None = None  # why the server's bytes did not decode
        self.lost = False

    @property
    def answers(self) -> int:
        return sum(1 for frame in self.frames if frame.opcode != Opcode.KEEPALIVE)

    def get_buffer(self) -> memoryview:
        return memoryview(self._buffer)

    def buffer_updated(self, nbytes: int) -> None:
        if self.broken is not None:
            return
        try:
            self._decoder.receive_data(memoryview(self._buffer)[:nbytes])
        except ProtocolError as exc:
            self.broken = str(exc)
        while (frame := self._decoder.next_frame()) is not None:
            self.frames.append(frame)

    def connection_lost(self, error: BaseException | None) -> None:
        self.lost = True


@dataclass
class Run:
    """What one input did, for the checks after its loop has ended."""

    requests: Requests
    peer: Peer
    closed: list[ServerSession]
    session: ServerSession
    pool: GpuPool
    reservations: ReservationTable
    problems: list[str] = field(default_factory=list)  # raised out of callbacks

    def pool_empty(self) -> bool:
        return all(
            not slot.tenants and not slot.leased_share and not slot.leased_memory
            for slot in self.pool.slots
        )


async def _until(condition: Callable[[], bool], what: str, run: Run, probe: bool = False) -> None:
    """Let the loop (and the device threads) run until ``condition`` holds; a hang after BOUND_S."""
    deadline = time.monotonic() + BOUND_S
    steps = 0
    while not condition():
        if time.monotonic() > deadline:
            raise InvariantBroken(
                f"hang: {what} did not happen within {BOUND_S} s "
                f"({run.peer.answers} answer(s) received, session closed: {bool(run.closed)})"
            )
        steps += 1
        # Mostly bare loop turns (callbacks); now and then a real sleep, for the device threads.
        await asyncio.sleep(0 if steps % 8 else 0.0005)
        if probe and steps == 16:
            run.session.probe()


async def _serve(config: Config, data: bytes, devices: list[Executor]) -> Run:
    loop = asyncio.get_running_loop()
    problems: list[str] = []
    loop.set_exception_handler(lambda _loop, context: _problem(problems, context))
    pool = GpuPool(
        [GpuSlot(i, e.properties.total_memory) for i, e in enumerate(devices)], min_share=MIN_SHARE
    )
    table = ReservationTable(pool, devices, SERVER_ID, MAX_IDLE_TIMEOUT)
    if config.waiting:
        waiting = table.reserve(1, 0.5, 0, 0.0, m.MODE_SHARE, "waiting", holder=None)
        waiting.secret = WAITING_SECRET
    client_end, server_end = memory_stream_pair(chunk=config.chunk)
    closed: list[ServerSession] = []
    session = ServerSession(server_end, table, config.limits, _describe_server, closed.append)
    server_end.start(session)
    peer = Peer(config.limits)
    client_end.start(peer)
    run = Run(Requests.of(data, config.limits), peer, closed, session, pool, table, problems)
    trace("requests", [(f.request_id, Opcode(f.opcode).name) for f in run.requests.frames])
    client_end.write(data)
    if config.linger:
        wanted = run.requests.wanting_replies
        await _until(
            lambda: bool(closed) or peer.lost or peer.answers >= wanted,
            f"an answer to each of {wanted} request(s)",
            run,
            probe=config.probe,
        )
    if config.stall and not closed:
        session.close_if_stalled(time.monotonic() + 1e6, 30.0)
    if config.sweep:
        table.sweep(time.monotonic() + 1e6)
    if config.abort:
        client_end.abort()
    else:
        client_end.close()
    await _until(lambda: bool(closed), "the session closing", run)
    # What outlives the connection: only reservations no connection holds (PROTOCOL.md 5.5.5).
    held = [r.id for r in table if r.holder is not None]
    check(not held, f"reservation(s) {held} outlived the connection holding them")
    table.close()
    await _until(run.pool_empty, "every lease back in the pool", run)
    return run


def _describe_server(detail: int) -> str:
    """SERVER_INFO's answer; the fuzzed part is the session's handling of it, not the text."""
    info: dict[str, Any] = {"server": {"id": SERVER_ID, "protocol": PROTOCOL_VERSION}}
    if detail != m.INFO_BRIEF:
        info["gpus"], info["reservations"] = [], []
    return json.dumps(info)


def _problem(problems: list[str], context: dict[str, Any]) -> None:
    """The loop's exception handler: everything that reaches it is a bug (but a known one may be
    let through, see ``FUZZ_AVOID``)."""
    error = context.get("exception")
    if (
        avoiding("get-buffer-after-error")
        and isinstance(error, ProtocolError)
        and any(f.name == "get_buffer" for f in traceback.extract_tb(error.__traceback__))
    ):
        return
    problems.append(_describe(context))


def _describe(context: dict[str, Any]) -> str:
    error = context.get("exception")
    if error is None:
        return str(context.get("message"))
    return "".join(traceback.format_exception(error))


def _check_output(run: Run, config: Config) -> None:
    """The server's bytes, held to the requests they answer."""
    peer, requests = run.peer, run.requests.frames
    check(peer.broken is None, f"the server wrote a malformed frame: {peer.broken}")
    by_id: defaultdict[int, list[int]] = defaultdict(list)
    for frame in requests:
        by_id[frame.request_id].append(frame.opcode)
    no_reply_ids = {f.request_id for f in requests if RULES[f.opcode].reply is None}
    answered: Counter[int] = Counter()
    for index, frame in enumerate(peer.frames):
        message = frame.message
        if frame.opcode == Opcode.KEEPALIVE:
            check(frame.request_id == 0, "a KEEPALIVE with a request id")
            continue
        if isinstance(message, ErrorReply):
            check(
                message.code != ErrorCode.INTERNAL, f"an INTERNAL error was sent: {message.message}"
            )
            if message.flags & ERROR_DEFERRED:
                check(
                    message.deferred_from in no_reply_ids,
                    f"deferred from #{message.deferred_from}, no no-reply request",
                )
            if message.flags & ERROR_FATAL:
                check(index == len(peer.frames) - 1, "frames after a fatal ERROR")
            if frame.request_id == 0:
                check(
                    bool(message.flags & ERROR_FATAL), "a connection-level ERROR that is not fatal"
                )
                continue
        else:
            check(
                frame.opcode in by_id.get(frame.request_id, ()),
                f"a {Opcode(frame.opcode).name} reply to #{frame.request_id}, never asked",
            )
        answered[frame.request_id] += 1
        check(
            answered[frame.request_id] <= len(by_id.get(frame.request_id, ())),
            f"#{frame.request_id} answered too often",
        )
        if isinstance(message, m.AuthenticateReply):
            # No token store: anyone is anonymous (PROTOCOL.md 5.7.1), and AUTHENTICATE is
            # answered only as the connection's first request (5.1).
            check(message.user == "", f"a server without tokens named the user {message.user!r}")
            check(
                requests[0].opcode == Opcode.AUTHENTICATE
                and frame.request_id == requests[0].request_id,
                "an AUTHENTICATE answered that was not the connection's first request",
            )
        if isinstance(message, m.HelloReply):
            check(
                all(
                    f.opcode in (Opcode.KEEPALIVE, Opcode.AUTHENTICATE) for f in peer.frames[:index]
                ),
                "a HELLO reply after other answers",
            )
            opening = next(f for f in requests if f.opcode != Opcode.AUTHENTICATE)
            hello = opening.message
            check(frame.opcode == opening.opcode, "a HELLO reply to another opcode")
            assert isinstance(hello, m.Hello | m.Attach)
            grants = message.devices
            gpus = hello.gpus if isinstance(hello, m.Hello) else 1  # the waiting reservation's
            check(len(grants) == gpus, f"{len(grants)} grant(s) for {hello!r}")
            check(len({g.server_gpu for g in grants}) == len(grants), "two grants on one GPU")
            check(message.max_payload == config.limits.max_payload, "the HELLO reply's max_payload")


def _check_in_context(run: Run, config: Config) -> None:
    """Each answer against the request it answers. docs/PROTOCOL.md section 8: on one device,
    answers come in request order, except the ERRORs for requests refused unrun (a device not in
    the session, a copy above max_payload); section 9.3: a deferred error is an earlier no-reply
    request's on the same device; and a copy's payload is as long as asked for."""
    requests = run.requests.frames
    position = {frame.request_id: index for index, frame in enumerate(requests)}
    if len(position) != len(requests):
        return  # a request id used twice: which answer is whose cannot be told
    grants = next(
        (len(f.message.devices) for f in run.peer.frames if isinstance(f.message, m.HelloReply)), 0
    )
    latest: dict[int, int] = {}  # device -> the position of the request answered last
    for frame in run.peer.frames:
        index = position.get(frame.request_id)
        device = None if index is None else getattr(requests[index].message, "device", None)
        if frame.opcode == Opcode.KEEPALIVE or index is None or device is None:
            continue
        request = requests[index].message
        unrun = device >= grants or (
            isinstance(request, m.MemcpyDtoH) and request.nbytes > config.limits.max_payload
        )
        reply = frame.message
        if isinstance(reply, m.MemcpyDtoHReply):
            assert isinstance(request, m.MemcpyDtoH)
            length = 0 if frame.payload is None else len(frame.payload)
            check(length == request.nbytes, f"{length} bytes copied out for {request!r}")
        if isinstance(reply, m.MemAllocReply):
            check(reply.ptr > 0 and reply.ptr % 256 == 0, f"allocated at {reply.ptr:#x}")
        if isinstance(reply, ErrorReply) and reply.flags & ERROR_DEFERRED:
            origin = position.get(reply.deferred_from, len(requests))
            check(
                origin < index, f"#{frame.request_id} deferred from a later #{reply.deferred_from}"
            )
            origin_device = getattr(requests[origin].message, "device", None)
            check(origin_device == device, f"device {device} given device {origin_device}'s error")
        if unrun and isinstance(reply, ErrorReply):
            continue
        if avoiding("query-overtakes-reply") and RULES[requests[index].opcode].query:
            continue
        if index < latest.get(device, -1):
            raise InvariantBroken(
                f"device {device}: the answer to #{frame.request_id} came after the answer to "
                f"#{requests[latest[device]].request_id}, a later request"
            )
        latest[device] = index


def _check_end(run: Run) -> None:
    check(run.closed == [run.session], f"the session closed {len(run.closed)} time(s)")
    check(not run.session.leases, "a closed session still holds leases")
    if run.problems:
        raise InvariantBroken("raised inside the event loop:\n" + "\n".join(run.problems))


def _make_instant(device: Executor) -> None:
    """Make ``device`` infinitely fast: each operation runs to its end as it is submitted, through
    the worker's own ``_execute`` (so sticky errors work as ever), and its completion is posted
    to the loop just as from the worker thread. The device is then always ahead of the loop,
    which real devices are only now and then, when the GIL changes hands at the wrong moment:
    races between completions and the loop become deterministic, so they reproduce."""

    def submit(
        tenant: Tenant,
        op: Callable[[], Any],
        *,
        wants_reply: bool,
        tag: int = 0,
        on_done: Completion | None = None,
    ) -> None:
        DeviceWorker._execute(tenant, op, wants_reply, tag, on_done)

    device.submit = submit  # type: ignore[method-assign]


def test_one_input(data: bytes) -> None:
    choices = Choices(data)
    config = Config.read(choices)
    written = (
        (encode_request(m.Authenticate(TOKEN), AUTH_ID) if config.authenticate else b"")
        + (encode_request(config.hello, 1) if config.send_hello else b"")
        + choices.rest()
    )
    with _harnessed() as errors:
        devices = create_executors("numpy", DEVICES, DEVICE_MEMORY, "fair")
        if config.instant:
            for device in devices:
                _make_instant(device)
        try:
            run = asyncio.run(_serve(config, written, devices))
        finally:
            for device in devices:
                device.close()  # joins its worker: no record can arrive after this
    if errors.records:
        record = errors.records[0]
        details = "".join(traceback.format_exception(*record.exc_info)) if record.exc_info else ""
        raise InvariantBroken(f"logged at {record.levelname}: {record.getMessage()}\n{details}")
    trace(
        "answers",
        [
            (f.request_id, Opcode(f.opcode).name, getattr(f.message, "message", ""))
            for f in run.peer.frames
        ],
    )
    _check_end(run)
    _check_output(run, config)
    _check_in_context(run, config)


def main() -> None:
    import atheris

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
