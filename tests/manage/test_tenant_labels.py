"""Tenant labels stay bounded, and counters under shared labels never go back."""

from __future__ import annotations

from bitfusion_net.manage.metrics import OTHER, TENANT_SERIES_PER_GPU, TenantLabels, _Totals


def _scrape(
    labels: TenantLabels, leases: dict[int, float], user: str | None = None, gpu: int = 0
) -> dict[str, float]:
    """One scrape of ``leases`` (id -> device seconds) on one GPU: label -> reported total."""
    totals: dict[str, float] = {}
    for lease, seconds in leases.items():
        label = labels.label(lease, gpu, user)
        totals[label] = totals.get(label, 0.0) + seconds
    return {k: v + labels.carried(k, gpu).device_time for k, v in totals.items()}


def _end(
    labels: TenantLabels,
    leases: dict[int, float],
    lease: int,
    final: float,
    user: str | None = None,
) -> None:
    """``lease`` ends, having used ``final`` seconds in all."""
    del leases[lease]
    labels.ended(lease, 0, user, _Totals(final))


def test_the_first_leases_get_labels_of_their_own_and_the_rest_share_other() -> None:
    labels = TenantLabels()
    leases = {i: 1.0 for i in range(TENANT_SERIES_PER_GPU + 5)}
    reported = _scrape(labels, leases)
    assert len(reported) == TENANT_SERIES_PER_GPU + 1
    assert reported[OTHER] == 5.0
    assert {f"lease-{i}" for i in range(TENANT_SERIES_PER_GPU)} <= set(reported)


def test_other_keeps_what_its_departed_leases_used_and_own_labels_go_with_their_lease() -> None:
    labels = TenantLabels()
    count = TENANT_SERIES_PER_GPU + 3
    leases = {i: 2.0 for i in range(count)}
    first = _scrape(labels, leases)
    assert first[OTHER] == 6.0
    # One named lease and two of "other" end, having worked since the scrape; the rest go on.
    for gone in (0, count - 1, count - 2):
        _end(labels, leases, gone, final=2.5)
    leases = {i: s + 1.0 for i, s in leases.items()}
    second = _scrape(labels, leases)
    assert "lease-0" not in second  # its series is removed with it
    assert second[OTHER] >= first[OTHER]  # never goes back: 3.0 now + 5.0 carried, final
    assert second[OTHER] == 8.0
    # A lease that arrives now takes the label lease 0 left free, not "other".
    leases[100] = 0.5
    third = _scrape(labels, leases)
    assert third["lease-100"] == 0.5 and third[OTHER] == 8.0


def test_a_lease_that_ends_between_scrapes_still_counts_under_other() -> None:
    labels = TenantLabels()
    leases = {i: 1.0 for i in range(TENANT_SERIES_PER_GPU)}
    _scrape(labels, leases)
    leases[50] = 0.0
    _end(labels, leases, 50, final=4.0)  # never scraped: it had no label of its own
    assert OTHER not in _scrape(labels, leases)  # no lease holds the label now: no series
    leases[51] = 0.5
    assert _scrape(labels, leases)[OTHER] == 4.5  # back, with what lease 50 did


def test_with_users_a_user_is_one_label_across_their_leases() -> None:
    labels = TenantLabels()
    leases = {1: 3.0, 2: 1.0}
    assert _scrape(labels, leases, user="alice") == {"alice": 4.0}
    _end(labels, leases, 1, final=3.5, user="alice")
    _end(labels, leases, 2, final=1.0, user="alice")
    leases[3] = 0.5
    assert _scrape(labels, leases, user="alice") == {"alice": 5.0}
