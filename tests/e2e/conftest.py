"""The e2e fixtures live in e2e_harness.py (a unique module name: several test folders may
have a conftest.py, and the tests import the harness's helpers by name)."""

from e2e_harness import federation  # noqa: F401 - a pytest fixture
