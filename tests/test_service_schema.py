"""A bounded schemathesis run against the OpenAPI schema the live service serves: no request
schemathesis generates, valid or not, gets a 5xx or a stack trace."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from test_service import LiveServer, home  # noqa: F401 - the fixture is used by name

from deltakit_service.settings import Settings

schemathesis = pytest.importorskip("schemathesis")


def test_no_generated_request_makes_the_service_fail(home):  # noqa: F811 - the fixture above
    root, tokens, _ = home
    headers = {"Authorization": f"Bearer {tokens['write']}"}
    with LiveServer(Settings(home=root)) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=headers)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 8
        calls = []
        for operation in operations:
            _fuzz(operation, url, headers, calls)
        assert len(calls) >= 5 * len(operations), "the run really exercised every operation"


def _fuzz(operation, url: str, headers: dict[str, str], calls: list[int]) -> None:
    @given(case=operation.as_strategy())
    @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def call(case) -> None:
        response = case.call(base_url=url, headers=headers, timeout=10)
        calls.append(response.status_code)
        assert response.status_code < 500, (operation.label, case.body, response.text)
        assert "Traceback" not in response.text

    call()
