"""Where in a pool a request goes: pure functions of what the servers said (``SERVER_INFO``).

Each server is the sole authority over its GPUs, so this only *chooses*; the servers then grant
or refuse (another client may have been faster, and the caller tries again). The choice: one
server that holds the whole request if there is one (locality; of several, the one left with
the least free share, best fit, as each server places on its own GPUs, which keeps whole servers
free for large requests), else the request spread over the servers with the most free share.
"""

from __future__ import annotations

import fnmatch
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SHARE_UNITS = 1_000_000  # a whole GPU, as servers count it (integer millionths)
MiB = 2**20


class FilterError(ValueError):
    """A ``--filter`` that cannot be understood; the message lists what can."""


@dataclass(frozen=True)
class Ask:
    """What the user asked for: ``gpus`` GPUs, each ``fraction`` of one or ``memory`` bytes."""

    gpus: int
    fraction: float = 0.0
    memory: int = 0

    def describe(self) -> str:
        each = f"{self.fraction:g} of a GPU" if self.fraction else f"{self.memory // MiB} MiB"
        return f"{self.gpus} GPU(s) of {each} each"

    def share_on(self, gpu: dict[str, Any], min_fraction: float) -> tuple[int, int]:
        """(share in millionths, memory limit) a lease of this ask takes on ``gpu``."""
        total = int(gpu["total_memory"])
        min_share = round(min_fraction * SHARE_UNITS)
        if self.fraction:
            share = round(self.fraction * SHARE_UNITS)
            return share, total * share // SHARE_UNITS
        if self.memory > total:
            return SHARE_UNITS + 1, self.memory
        return max(-(-self.memory * SHARE_UNITS // total), min_share), self.memory


def free_share(gpu: dict[str, Any]) -> int:
    return SHARE_UNITS - round(float(gpu["leased_fraction"]) * SHARE_UNITS)


def fits(ask: Ask, gpu: dict[str, Any], min_fraction: float) -> bool:
    share, limit = ask.share_on(gpu, min_fraction)
    free_memory = int(gpu["total_memory"]) - int(gpu["leased_memory"])
    return share <= free_share(gpu) and limit <= free_memory


# -- filters (Bitfusion's --filter KEY=VALUE, one condition per flag) ----------------------------
_OPERATORS: list[tuple[str, Callable[[Any, Any], bool]]] = [
    (">=", operator.ge), ("<=", operator.le), ("!=", operator.ne),
    ("=", operator.eq), (">", operator.gt), ("<", operator.lt),
]  # fmt: skip
# key -> (what it reads from a server's info and one of its GPUs, whether it is a number)
FILTER_KEYS: dict[str, tuple[Callable[[dict[str, Any], dict[str, Any]], Any], bool]] = {
    # the address the client reached it at (a server on 0.0.0.0 reports that), else its own
    "server.addr": (
        lambda s, g: str(s.get("reached_at") or s.get("address", "")).removeprefix("tcp://"),
        False,
    ),
    "server.hostname": (lambda s, g: s.get("hostname", ""), False),
    "server.executor": (lambda s, g: s.get("executor", ""), False),
    "server.has-rdma": (  # it serves rdma:// (SERVER_INFO's addresses)
        lambda s, g: str(any(a.startswith("rdma://") for a in s.get("addresses", []))).lower(),
        False,
    ),
    "device.id": (lambda s, g: g.get("gpu", -1), True),
    "device.name": (lambda s, g: g.get("name", ""), False),
    "device.phy-memory": (lambda s, g: int(g.get("total_memory", 0)) // MiB, True),  # MiB
    "device.executor": (lambda s, g: g.get("executor", ""), False),
}


@dataclass(frozen=True)
class Filter:
    key: str
    op: str
    value: str

    @classmethod
    def parse(cls, text: str) -> Filter:
        for symbol, _ in _OPERATORS:
            key, found, value = text.partition(symbol)
            if found and key.strip() and value.strip():
                key, value = key.strip(), value.strip()
                if key not in FILTER_KEYS:
                    raise FilterError(
                        f"unknown filter key {key!r}; known: {', '.join(sorted(FILTER_KEYS))}"
                    )
                numeric = FILTER_KEYS[key][1]
                if numeric:
                    try:
                        float(value)
                    except ValueError:
                        raise FilterError(f"--filter {text}: {key} takes a number") from None
                elif symbol not in ("=", "!="):
                    raise FilterError(f"--filter {text}: {key} takes = or != (globs allowed)")
                return cls(key, symbol, value)
        raise FilterError(f"--filter {text!r}: expected KEY=VALUE (or KEY>=NUMBER, ...)")

    def accepts(self, server: dict[str, Any], gpu: dict[str, Any]) -> bool:
        read, numeric = FILTER_KEYS[self.key]
        actual = read(server, gpu)
        compare = dict(_OPERATORS)[self.op]
        if numeric:
            return bool(compare(float(actual), float(self.value)))
        matched = fnmatch.fnmatch(str(actual).lower(), self.value.lower())
        return matched if self.op == "=" else not matched


def eligible_gpus(info: dict[str, Any], filters: list[Filter]) -> list[dict[str, Any]]:
    server = info.get("server", {})
    return [g for g in info.get("gpus", []) if all(f.accepts(server, g) for f in filters)]


# -- the choice ---------------------------------------------------------------------------------
class NoRoom(Exception):
    """The pool cannot hold the request now; the message says what is free where."""


def choose(
    ask: Ask, servers: list[tuple[Any, dict[str, Any]]], filters: list[Filter]
) -> list[tuple[Any, int]]:
    """How many GPUs to reserve on which server: ``[(key, count), ...]`` from ``servers``, a
    list of ``(key, info)`` (the GPUs the filters allow there: ``eligible_gpus``). Raises
    ``NoRoom`` naming what is free where."""
    room: list[tuple[Any, int, int]] = []  # (key, GPUs with room, total free share)
    for key, info in servers:
        min_fraction = float(info.get("server", {}).get("min_fraction", 0.05))
        gpus = eligible_gpus(info, filters)
        count = sum(1 for g in gpus if fits(ask, g, min_fraction))
        room.append((key, count, sum(free_share(g) for g in gpus)))
    whole = [r for r in room if r[1] >= ask.gpus]
    if whole:
        key, _, _ = min(whole, key=lambda r: r[2])  # best fit
        return [(key, ask.gpus)]
    plan, left = [], ask.gpus
    for key, count, _ in sorted(room, key=lambda r: -r[2]):
        if count and left:
            take = min(count, left)
            plan.append((key, take))
            left -= take
    if left:
        free = (
            "; ".join(f"{_name(key, info)}: {_free_text(info, filters)}" for key, info in servers)
            or "no server answered"
        )
        raise NoRoom(
            f"asked for {ask.describe()}, and the pool has room for {ask.gpus - left} "
            f"(free: {free})"
        )
    return plan


def _name(key: Any, info: dict[str, Any]) -> str:
    return str(info.get("server", {}).get("address", key)).removeprefix("tcp://")


def _free_text(info: dict[str, Any], filters: list[Filter]) -> str:
    gpus = eligible_gpus(info, filters)
    if not gpus:
        return "no GPU matches the filters" if filters else "no GPUs"
    return ", ".join(
        f"gpu{g['gpu']} {free_share(g) / SHARE_UNITS:.2f} free "
        f"({(int(g['total_memory']) - int(g['leased_memory'])) // MiB} MiB)"
        for g in gpus
    )


def fraction_of(memory: int, gpu_memory: int) -> float:
    """The fraction of a GPU that ``memory`` bytes is (Bitfusion's "partial memory")."""
    return math.ceil(memory * 1000 / gpu_memory) / 1000 if gpu_memory else 0.0
