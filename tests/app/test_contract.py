"""The OpenAPI document is a contract, checked by schemathesis against the live app on both databases.

Every operation gets generated valid and invalid requests (positive and negative modes), sent once as
a participant of an open competition and once as an organizer. The checks: no 5xx, every status is
declared for its operation, every body matches its declared schema, and invalid data is rejected.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.factories import join, make_competition, make_organizer

CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance, negative_data_rejection]
# Bounded so the whole contract run (every operation x 2 roles x 2 databases) stays around two minutes.
EXAMPLES = 80


@pytest.fixture(params=["participant", "organizer"])
def role_headers(request, client, admin_headers) -> dict[str, str]:
    org = make_organizer(client, admin_headers)
    comp = make_competition(client, org, slug="open")
    student = join(client, comp["slug"])
    return org if request.param == "organizer" else {"Authorization": student["Authorization"]}


def _schema():
    from app.main import create_app

    app = create_app()  # the document is static; each call reaches this app in-process, on the test database
    loaded = schemathesis.openapi.from_dict(app.openapi())
    loaded.app = app
    loaded.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                    max_examples=EXAMPLES, deterministic=True, database="none")
    return loaded


schema = _schema()


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_api_honours_its_openapi_contract(case, role_headers):
    case.call_and_validate(headers=role_headers, checks=CHECKS)
