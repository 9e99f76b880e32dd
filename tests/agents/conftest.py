"""The commercial providers' mocks and a gateway pointed at them (tests/providers/conftest.py), for the
coding agents' APIs."""
from tests.providers.conftest import cgw, ckey, fresh, mocks  # noqa: F401 - fixtures
