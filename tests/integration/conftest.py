"""The integration tests that take ``api`` run once with the async client and once with the blocking one."""

from __future__ import annotations

import pytest
from integration_support import ClientApi


@pytest.fixture(params=["async", "blocking"])
def api(request: pytest.FixtureRequest) -> ClientApi:
    return ClientApi(request.param)
