"""Tenant labels stay bounded, and counters under shared labels never go back."""

from __future__ import annotations

from bitfusion_net.manage.metrics import OTHER, TENANT_SERIES_PER_GPU, TenantLabels, _Totals


def _scrape(
    labels: TenantLabels, leases: dict[int, float], user: str | None = None, gpu: int = 0
) -> dict[str, float]:
    """One scrape of ``leases`` (id -> device seconds) on one GPU: label -> reported total."""
    seen, totals = {}, {}
    for lease, seconds in leases.items():
        label = labels.label(lease, gpu, user)
        seen[lease, gpu] = (label, _Totals(seconds))
        totals[label] = totals.get(label, 0.0) + seconds
    labels.settle(seen)
    return {k: v + labels.carried(k, gpu).device_time for k, v in totals.items()}


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
    # One named lease and two of "other" end; the rest go on using the device.
    for gone in (0, count - 1, count - 2):
        del leases[gone]
    leases = {i: s + 1.0 for i, s in leases.items()}
    second = _scrape(labels, leases)
    assert "lease-0" not in second  # its series is removed with it
    assert second[OTHER] >= first[OTHER]  # never goes back: 3.0 now + 4.0 carried
    assert second[OTHER] == 7.0
    # A lease that arrives now takes the label lease 0 left free, not "other".
    leases[100] = 0.5
    third = _scrape(labels, leases)
    assert third["lease-100"] == 0.5 and third[OTHER] == 7.0


def test_with_users_a_user_is_one_label_across_their_leases() -> None:
    labels = TenantLabels()
    first = _scrape(labels, {1: 3.0, 2: 1.0}, user="alice")
    assert first == {"alice": 4.0}
    second = _scrape(labels, {3: 0.5}, user="alice")  # both ended; a new one began
    assert second == {"alice": 4.5}
