"""Fixtures shared by several test modules (defined here once, so that a session-scoped one runs once)."""

from tests.reliability_helpers import metachar_workflow  # noqa: F401
