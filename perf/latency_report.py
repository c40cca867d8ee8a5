"""The report of ``perf/latency.py``: the table on stdout, the targets, the JSON file, the plot."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

KiB, MiB, GiB = 2**10, 2**20, 2**30
TARGETS = {
    "round_trip_vs_uvloop": 1.25,  # async API p50 <= 1.25 x the raw uvloop echo's
    "blocking_vs_blocking_echo": 1.5,  # blocking API p50 <= 1.5 x the blocking-socket echo's
    "p99_over_p50": 3.0,  # p99 <= 3 x p50, both APIs
    "copy_vs_c": 0.80,  # 64 MiB copies >= 80 % of the C stream's bandwidth, both APIs
    "launches_async": 150_000.0,
    "launches_blocking": 100_000.0,
    "mlp_ratio": 1.10,  # remote step <= 1.10 x in-process
    "concurrent_requests": 100_000.0,  # small synchronous requests per second, 8 clients
}


def format_size(size: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "us":
        return f"{value:,.1f} us" if value < 10_000 else f"{value / 1e3:,.1f} ms"
    if unit == "GB/s":
        return f"{value:.3f} GB/s" if value < 0.1 else f"{value:.2f} GB/s"
    if unit == "/s":
        return f"{value:,.0f} /s"
    if unit == "ms":
        return f"{value:.3f} ms"
    return f"{value:.3g} {unit}".strip()


def ratio(value: float | None, reference: float | None) -> str:
    if value is None or reference is None or reference <= 0:
        return "-"
    return f"{value / reference:.2f}x"


def get(tree: Any, *path: str) -> Any:
    """``tree[path[0]][path[1]]...``, or None where any step is missing."""
    node = tree
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _gb(value: float | None) -> str:
    return "-" if value is None else (f"{value:.3f}" if value < 0.1 else f"{value:.2f}")


def print_report(results: dict[str, Any]) -> None:
    base = results["baselines"]
    c_rtt, uv_rtt = get(base, "c", "round_trip"), get(base, "uvloop", "round_trip")
    print()
    print("bitfusion-net latency report" + ("  (--quick)" if results["meta"]["quick"] else ""))
    print(f"  {results['meta']['machine']}; server {results['meta'].get('server', '?')}")
    print("  x C / x uvloop: our figure divided by the C baseline's / the raw uvloop echo's")
    print("  (latency: lower is better; GB/s and rates: higher is better)")
    print()
    header = f"{'figure':<46}{'value':>14}{'C TCP':>14}{'x C':>8}{'uvloop':>14}{'x uvloop':>10}"
    print(header)
    print("-" * len(header))

    def row(label: str, value: float | None, unit: str, c: float | None, uv: float | None) -> None:
        print(
            f"{label:<46}{fmt(value, unit):>14}{fmt(c, unit):>14}{ratio(value, c):>8}"
            f"{fmt(uv, unit):>14}{ratio(value, uv):>10}"
        )

    rtt_rows = [
        ("round trip mem_get_info, async API", get(results, "round_trip", "async")),
        ("round trip mem_get_info, blocking API", get(results, "round_trip", "blocking")),
        ("C TCP ping-pong (baseline)", c_rtt),
        ("uvloop echo ping-pong (baseline)", uv_rtt),
        ("blocking-socket echo, Python (baseline)", get(base, "blocking_echo", "round_trip")),
        ("raw wire client to our server", get(base, "raw_wire", "round_trip")),
        ("pyzmq REQ/REP (baseline)", get(base, "zmq", "round_trip")),
        ("grpcio unary (baseline)", get(base, "grpc", "round_trip")),
    ]
    for label, data in rtt_rows:
        if data is None:
            continue
        for key, name in (("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9")):
            row(f"{label} {name}", data[key], "us", get(c_rtt, key), get(uv_rtt, key))
    for kind in ("c", "zmq", "grpc"):
        skipped = get(base, kind, "skipped")
        if skipped:
            print(f"  {kind}: skipped: {skipped}")
    print()

    c_posts = get(base, "c", "posts", "per_second")
    uv_posts = get(base, "uvloop", "posts", "per_second")
    for label, key in (
        ("launches/s pipelined, async API", "async"),
        ("launches/s pipelined, blocking API", "blocking"),
        ("launches/s in-process executor (no network)", "inprocess"),
    ):
        row(label, get(results, "launches", key, "per_second"), "/s", c_posts, uv_posts)
    row("C TCP pipelined 86 B messages (baseline)", c_posts, "/s", c_posts, uv_posts)
    row("uvloop pipelined 86 B messages (baseline)", uv_posts, "/s", c_posts, uv_posts)
    print()

    mlp = results.get("mlp") or {}
    if mlp:
        shape = mlp["shape"]
        print(
            f"MLP SGD step, batch {shape['batch']}, {shape['inputs']}-{shape['hidden']}-"
            f"{shape['classes']}: {mlp['kernels_per_step']} kernels, 3 copies in "
            f"({mlp['bytes_in_per_step'] / 1e3:.0f} kB), 1 copy back; median of "
            f"{len(mlp['remote_rounds_ms'])} alternating rounds"
        )
        print(f"  remote      {fmt(mlp['remote_step_ms'], 'ms'):>12}")
        print(f"  in-process  {fmt(mlp['inprocess_step_ms'], 'ms'):>12}")
        print(
            f"  ratio       {mlp['ratio']:>10.3f}x   results identical: {mlp['result_match']}"
            f" (max |W2 diff| {mlp['max_abs_diff_w2']:.2g}; loss {mlp['loss_first']:.4f}"
            f" -> {mlp['loss_last']:.4f})"
        )
        print()

    print(
        f"{'copy size':>10} {'htod p50':>10} {'GB/s':>7} {'x C':>6} {'x uv':>6}"
        f" {'dtoh p50':>10} {'GB/s':>7} {'x C':>6} {'x uv':>6}"
        f" | {'C put':>6} {'C get':>6} {'uv put':>6} {'uv get':>6} GB/s"
    )
    print("-" * 112)
    lookup = {
        (name, r["size"]): r["gbps"]
        for name, series in (
            ("cput", get(base, "c", "put") or []),
            ("cget", get(base, "c", "get") or []),
            ("uput", get(base, "uvloop", "put") or []),
            ("uget", get(base, "uvloop", "get") or []),
        )
        for r in series
    }
    ours = results["memcpy"]
    for up, down in zip(ours["htod"], ours["dtoh"], strict=True):
        size = up["size"]
        cp, cg = lookup.get(("cput", size)), lookup.get(("cget", size))
        uvp, uvg = lookup.get(("uput", size)), lookup.get(("uget", size))
        print(
            f"{format_size(size):>10} {fmt(up['p50_us'], 'us'):>10} {_gb(up['gbps']):>7}"
            f" {ratio(up['gbps'], cp):>6} {ratio(up['gbps'], uvp):>6}"
            f" {fmt(down['p50_us'], 'us'):>10} {_gb(down['gbps']):>7}"
            f" {ratio(down['gbps'], cg):>6} {ratio(down['gbps'], uvg):>6}"
            f" | {_gb(cp):>6} {_gb(cg):>6} {_gb(uvp):>6} {_gb(uvg):>6}"
        )
    print()

    h2h = results.get("head_to_head") or {}
    if h2h:
        median = h2h["median_of_round_ratios"]
        print(
            f"head to head: {h2h['rounds']} rounds, each measuring ours, uvloop and C back to back;"
            " best round of each (the median of per-round ratios in brackets)"
        )
        rtt, ratios = h2h["round_trip_p50_us"], h2h["ratios"]
        print(
            f"  round trip p50: ours {fmt(rtt['ours'], 'us')}, uvloop {fmt(rtt.get('uvloop'), 'us')},"
            f" C {fmt(rtt.get('c'), 'us')}; ours/uvloop {_x(ratios['rtt_vs_uvloop'])}"
            f" [{_x(median['rtt_vs_uvloop'])}], ours/C {_x(ratios['rtt_vs_c'])}"
            f" [{_x(median['rtt_vs_c'])}]"
        )
        print(
            f"  blocking round trip p50: ours {fmt(rtt.get('blocking'), 'us')}, blocking echo "
            f"{fmt(rtt.get('blocking_echo'), 'us')}, raw wire {fmt(rtt.get('raw_wire'), 'us')}; "
            f"ours/echo {_x(ratios.get('rtt_blocking_vs_blocking_echo'))}"
            f" [{_x(median.get('rtt_blocking_vs_blocking_echo'))}], raw/echo "
            f"{_x(ratios.get('rtt_raw_wire_vs_blocking_echo'))}"
        )
        copy = h2h["copy_gbps"]
        print(
            f"  {format_size(h2h['copy_size'])} copies GB/s: ours htod {_gb(copy['ours_htod'])},"
            f" dtoh {_gb(copy['ours_dtoh'])}; C put {_gb(copy.get('c_put'))},"
            f" get {_gb(copy.get('c_get'))}; uvloop put {_gb(copy.get('uvloop_put'))},"
            f" get {_gb(copy.get('uvloop_get'))}; htod/C {_x(ratios['htod_vs_c'])}"
            f" [{_x(median['htod_vs_c'])}], dtoh/C {_x(ratios['dtoh_vs_c'])}"
            f" [{_x(median['dtoh_vs_c'])}]; blocking htod {_gb(copy.get('blocking_htod'))},"
            f" dtoh {_gb(copy.get('blocking_dtoh'))}"
        )
        print()
    concurrent = results.get("concurrent")
    if concurrent:
        print(
            f"{concurrent['clients']} concurrent blocking clients: "
            f"{fmt(concurrent['per_second'], '/s')} mem_get_info, server CPU "
            f"{fmt(concurrent['server_cpu_us_per_request'], 'us')} per request"
        )
        print()

    print("targets (reported, not asserted)")
    for name, target in results["targets"].items():
        state = {True: "met", False: "MISSED", None: "n/a"}[target["met"]]
        print(f"  {state:<7}{name}: {target['text']}")
    for note in results["notes"]:
        print(f"  note: {note}")
    print()


def evaluate_targets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The issue's targets, from the head-to-head rounds' best figures (else from the sweep)."""
    base, h2h = results["baselines"], results.get("head_to_head") or {}
    ours_p50 = get(h2h, "round_trip_p50_us", "ours") or get(
        results, "round_trip", "async", "p50_us"
    )
    blocking_p50 = get(results, "round_trip", "blocking", "p50_us")
    uv_p50 = get(h2h, "round_trip_p50_us", "uvloop") or get(base, "uvloop", "round_trip", "p50_us")
    targets: dict[str, dict[str, Any]] = {}

    def target(name: str, value: float | None, limit: float, at_most: bool, text: str) -> None:
        met = None if value is None else (value <= limit if at_most else value >= limit)
        targets[name] = {
            "value": value,
            "target": f"{'<=' if at_most else '>='} {limit:g}",
            "met": met,
            "text": text,
        }

    limit = TARGETS["round_trip_vs_uvloop"]
    value = get(h2h, "ratios", "rtt_vs_uvloop")
    if value is None and ours_p50 and uv_p50:
        value = ours_p50 / uv_p50
    target(
        "round_trip_p50_vs_uvloop",
        value,
        limit,
        True,
        f"async round trip p50 {fmt(ours_p50, 'us')} = {value or 0:.2f}x uvloop echo "
        f"{fmt(uv_p50, 'us')} (target <= {limit}x)",
    )
    limit = TARGETS["blocking_vs_blocking_echo"]
    value = get(h2h, "ratios", "rtt_blocking_vs_blocking_echo")
    echo_p50 = get(h2h, "round_trip_p50_us", "blocking_echo")
    mine = get(h2h, "round_trip_p50_us", "blocking") or blocking_p50
    target(
        "blocking_round_trip_p50_vs_blocking_echo",
        value,
        limit,
        True,
        f"blocking round trip p50 {fmt(mine, 'us')} = {value or 0:.2f}x blocking-socket echo "
        f"{fmt(echo_p50, 'us')} (target <= {limit}x)",
    )
    for api in ("async", "blocking"):
        p50, p99 = (get(results, "round_trip", api, key) for key in ("p50_us", "p99_us"))
        tail = p99 / p50 if p50 and p99 else None
        target(
            f"round_trip_p99_over_p50_{api}",
            tail,
            TARGETS["p99_over_p50"],
            True,
            f"{api} round trip p99 {fmt(p99, 'us')} = {tail or 0:.2f}x its p50 (target <= 3x)",
        )
    for kind, package in (("zmq", "pyzmq"), ("grpc", "grpcio")):
        other = get(base, kind, "round_trip", "p50_us")
        targets[f"round_trip_p50_below_{kind}"] = {
            "value": other,
            "target": "ours < baseline",
            "met": None if other is None or ours_p50 is None else ours_p50 < other,
            "text": f"async round trip p50 {fmt(ours_p50, 'us')} below {package} "
            f"{fmt(other, 'us')}" + ("" if other else " (skipped)"),
        }

    size = h2h.get("copy_size") or max(results["meta"]["sizes"])
    for api, prefix in (("async", "ours"), ("blocking", "blocking")):
        for ours_key, c_key in (("htod", "put"), ("dtoh", "get")):
            mine = get(h2h, "copy_gbps", f"{prefix}_{ours_key}")
            c = get(h2h, "copy_gbps", f"c_{c_key}")
            name = f"{ours_key}_vs_c" if api == "async" else f"blocking_{ours_key}_vs_c"
            value = get(h2h, "ratios", name)
            target(
                f"copy_{ours_key}_{format_size(size).replace(' ', '')}_vs_c_{api}",
                value,
                TARGETS["copy_vs_c"],
                False,
                f"{api} {ours_key} {format_size(size)} {fmt(mine, 'GB/s')} = "
                f"{(value or 0) * 100:.0f}% of C {c_key} {fmt(c, 'GB/s')} (target >= 80%)",
            )
    for api in ("async", "blocking"):
        rate = get(results, "launches", api, "per_second")
        limit = TARGETS[f"launches_{api}"]
        target(
            f"launches_per_second_{api}",
            rate,
            limit,
            False,
            f"pipelined launches, {api} API {fmt(rate, '/s')} (target >= {limit:,.0f} /s)",
        )
    mlp_ratio = get(results, "mlp", "ratio")
    target(
        "mlp_ratio",
        mlp_ratio,
        TARGETS["mlp_ratio"],
        True,
        f"remote MLP step {mlp_ratio or 0:.3f}x in-process (target <= 1.10x)",
    )
    rate = get(results, "concurrent", "per_second")
    cpu = get(results, "concurrent", "server_cpu_us_per_request")
    target(
        "concurrent_requests_per_second",
        rate,
        TARGETS["concurrent_requests"],
        False,
        f"8 concurrent clients: {fmt(rate, '/s')} small synchronous requests, server CPU "
        f"{fmt(cpu, 'us')} per request (target >= 100,000 /s)",
    )
    return targets


def plot(results: dict[str, Any], path: Path) -> str:
    """Latency and bandwidth against copy size, ours against the baselines; returns a note."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: plot skipped (pip install -e '.[bench]')"
    base = results["baselines"]
    series = [
        ("ours htod + synchronize", results["memcpy"]["htod"], "C0", "-"),
        ("ours dtoh", results["memcpy"]["dtoh"], "C0", "--"),
        ("C TCP put (+1 B ack)", get(base, "c", "put"), "C1", "-"),
        ("C TCP get", get(base, "c", "get"), "C1", "--"),
        ("uvloop put (+1 B ack)", get(base, "uvloop", "put"), "C2", "-"),
        ("uvloop get", get(base, "uvloop", "get"), "C2", "--"),
    ]
    figure, (latency, bandwidth) = plt.subplots(1, 2, figsize=(13, 5))
    for label, data, color, style in series:
        if not data:
            continue
        sizes = [r["size"] for r in data]
        for axes, key in ((latency, "p50_us"), (bandwidth, "gbps")):
            axes.plot(
                sizes, [r[key] for r in data], style, color=color, marker="o", ms=3, label=label
            )
    for label, value, color in (
        ("ours round trip", get(results, "round_trip", "async", "p50_us"), "C0"),
        ("C round trip", get(base, "c", "round_trip", "p50_us"), "C1"),
        ("uvloop round trip", get(base, "uvloop", "round_trip", "p50_us"), "C2"),
    ):
        if value:
            latency.axhline(value, color=color, linestyle=":", linewidth=1, label=f"{label} p50")
    latency.set(xscale="log", yscale="log", xlabel="copy size (bytes)", ylabel="p50 latency (us)")
    latency.set_title("copy latency")
    bandwidth.set(xscale="log", xlabel="copy size (bytes)", ylabel="GB/s (size / p50)")
    bandwidth.set_title("copy bandwidth")
    for axes in (latency, bandwidth):
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(
        f"bitfusion-net vs baselines, same machine ({results['meta']['machine']})", fontsize=9
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return f"plot written to {path}"


def write_json(results: dict[str, Any], path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)
