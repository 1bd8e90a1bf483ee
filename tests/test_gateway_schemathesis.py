"""Property-based: the gateway, over real HTTP, answers as its own OpenAPI schema says.

schemathesis generates valid and invalid requests from the app's OpenAPI document (the one it
serves at /openapi.json) and sends them to a real gateway process, checking every response:
no 5xx, documented status codes, content types and bodies, and that auth is not ignored.

The schema is built at import from ``create_app(...).openapi()``, not from a fixture:
schemathesis's lazy ``from_fixture`` loader breaks under pytest 9.2 (it rewrites the
private ``Function._nodeid``, which pytest no longer has).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from contract import defaults
from contract.errors import UnsupportedModel
from producer.gateway import MAX_WAIT_S, GatewaySettings, create_app
from tests.support import RedisServer
from tests.support_gateway import GatewayProcess, register_idle_model

TOKEN = "schema-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def gateway(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    # The default model is declared, so generated submissions can succeed; no worker runs.
    register_idle_model(redis_server.url, defaults.MODEL)
    process = GatewayProcess(redis_server.url, tmp_path_factory.mktemp("schema"), token=TOKEN)
    process.start()
    yield process
    process.stop()


# A body over the size limit is refused with 413 before it is parsed: also a rejection.
REJECTED = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429]
CONFIG = schemathesis.Config.from_dict(
    {"checks": {"negative_data_rejection": {"expected-statuses": REJECTED}}}
)
# The same document the gateway process serves: it is built by the same code and settings.
schema = schemathesis.openapi.from_dict(
    create_app(GatewaySettings(token=TOKEN)).openapi(), config=CONFIG
)


@schema.parametrize()
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
def test_gateway_conforms_to_its_own_openapi_schema(
    case: schemathesis.Case, gateway: GatewayProcess
) -> None:
    _cut_long_polls(case)
    case.call_and_validate(
        base_url=gateway.url,
        headers=AUTH,
        excluded_checks=[positive_data_acceptance],
        additional_checks=[schema_valid_requests_are_accepted],
    )


def _cut_long_polls(case: schemathesis.Case) -> None:
    """A generated job stays queued (no worker runs), so a valid ``wait`` would block for up to
    a minute; cut it to a tenth of a second. test_gateway.py covers long polls that finish."""
    try:
        too_long = 0.1 < float(case.query["wait"]) <= MAX_WAIT_S
    except (TypeError, KeyError, ValueError):
        return
    if too_long:
        case.query["wait"] = 0.1


def schema_valid_requests_are_accepted(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> None:
    """schemathesis's positive-data check, except for a model no worker has registered, and for
    an integer written as a float.

    Which models exist is state, not schema: that one refusal (422 unsupported_model) is right.
    JSON Schema counts 87.0 as an integer; the gateway refuses it on purpose, as the Python API
    refuses a float top_k (strict types: no silent coercion).
    """
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return
    if response.status_code < 400 or response.status_code in (401, 404, 409, 429, 503):
        return
    if response.status_code == 422 and _error_type(response) == UnsupportedModel.type:
        return
    if response.status_code == 422 and _has_integral_float(case.body):
        return
    raise AssertionError(f"schema-valid request refused: {response.status_code} {response.text}")


def _has_integral_float(value: object) -> bool:
    if isinstance(value, float):
        return value.is_integer()
    if isinstance(value, dict):
        return any(_has_integral_float(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_integral_float(v) for v in value)
    return False


def _error_type(response: schemathesis.Response) -> str | None:
    try:
        return response.json()["error"]["type"]
    except (ValueError, KeyError, TypeError):
        return None
