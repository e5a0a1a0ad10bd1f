"""Every domain error a service can raise maps to a status the OpenAPI document can declare."""

from app import errors
from app.http import _DESCRIPTIONS, STATUS_OF


def test_every_domain_error_has_a_declared_status():
    kinds = [v for v in vars(errors).values()
             if isinstance(v, type) and issubclass(v, errors.DomainError) and v is not errors.DomainError]
    assert kinds and set(kinds) == set(STATUS_OF)
    assert all(code in _DESCRIPTIONS for code in STATUS_OF.values())
