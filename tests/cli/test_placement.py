"""Pool placement: locality first (best fit), else spread over the servers with most free share."""

from __future__ import annotations

from typing import Any

import pytest

from bitfusion_net.cli.placement import Ask, Filter, FilterError, NoRoom, choose, fits

GiB = 2**30


def gpu(
    index: int, leased: float = 0.0, total: int = 16 * GiB, name: str = "GPU"
) -> dict[str, Any]:
    return {
        "gpu": index,
        "name": name,
        "executor": "numpy",
        "total_memory": total,
        "leased_fraction": leased,
        "leased_memory": int(total * leased),
    }


def server(address: str, *gpus: dict[str, Any], hostname: str = "h") -> dict[str, Any]:
    return {
        "server": {"address": f"tcp://{address}", "hostname": hostname, "min_fraction": 0.05},
        "gpus": list(gpus),
    }


def test_one_server_that_holds_the_whole_request_wins_and_the_fullest_of_those() -> None:
    a = server("a:1", gpu(0), gpu(1))  # 2.0 free
    b = server("b:1", gpu(0, 0.5), gpu(1, 0.5))  # 1.0 free: holds 2 x 0.5 too, and is fuller
    c = server("c:1", gpu(0))
    plan = choose(Ask(2, 0.5), [("a", a), ("b", b), ("c", c)], [])
    assert plan == [("b", 2)]


def test_without_one_server_for_all_it_spreads_over_the_most_free() -> None:
    a = server("a:1", gpu(0))
    b = server("b:1", gpu(0), gpu(1, 1.0))
    c = server("c:1", gpu(0, 0.9))
    plan = choose(Ask(2, 1.0), [("a", a), ("b", b), ("c", c)], [])
    assert sorted(plan) == [("a", 1), ("b", 1)]


def test_no_room_says_what_was_asked_and_what_is_free_where() -> None:
    a = server("a:1", gpu(0, 0.8))
    with pytest.raises(NoRoom) as caught:
        choose(Ask(1, 0.5), [("a", a)], [])
    text = str(caught.value)
    assert "1 GPU(s) of 0.5 of a GPU" in text and "a:1: gpu0 0.20 free" in text


def test_memory_requests_need_the_memory_and_at_least_the_smallest_share() -> None:
    small = gpu(0, total=4 * GiB)
    assert fits(Ask(1, memory=4 * GiB), small, 0.05)
    assert not fits(Ask(1, memory=4 * GiB + 1), small, 0.05)
    nearly_full = gpu(0, leased=0.97)
    assert not fits(Ask(1, memory=1), nearly_full, 0.05)  # 1 byte still takes 1/20 of the GPU


@pytest.mark.parametrize(
    ("text", "accepted"),
    [
        ("device.name=*A100*", [1]),
        ("device.name!=*a100*", [0]),
        ("device.phy-memory>=40000", [1]),
        ("device.id=0", [0]),
        ("server.addr=a:1", [0, 1]),
        ("server.hostname=other", []),
    ],
)
def test_filters_narrow_servers_and_gpus(text: str, accepted: list[int]) -> None:
    info = server("a:1", gpu(0, name="Tesla V100"), gpu(1, total=80 * GiB, name="NVIDIA A100"))
    rule = Filter.parse(text)
    assert [g["gpu"] for g in info["gpus"] if rule.accepts(info["server"], g)] == accepted


@pytest.mark.parametrize(
    "text", ["nonsense", "device.colour=red", "device.phy-memory>=lots", "device.name>=x"]
)
def test_bad_filters_are_refused_saying_what_is_known(text: str) -> None:
    with pytest.raises(FilterError):
        Filter.parse(text)


def test_filtered_out_gpus_are_not_used_and_the_refusal_says_so() -> None:
    info = server("a:1", gpu(0, name="V100"))
    with pytest.raises(NoRoom, match="no GPU matches the filters"):
        choose(Ask(1, 0.5), [("a", info)], [Filter.parse("device.name=A100")])


def test_has_rdma_is_true_for_a_server_that_also_serves_rdma() -> None:
    plain = server("a:1", gpu(0))
    both = server("b:1", gpu(0))
    both["server"]["addresses"] = ["tcp://b:1", "rdma://b:2"]
    wants, refuses = Filter.parse("server.has-rdma=true"), Filter.parse("server.has-rdma=false")
    assert [rule.accepts(plain["server"], plain["gpus"][0]) for rule in (wants, refuses)] == [
        False,
        True,
    ]
    assert [rule.accepts(both["server"], both["gpus"][0]) for rule in (wants, refuses)] == [
        True,
        False,
    ]
