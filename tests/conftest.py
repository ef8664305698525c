"""Shared fixtures. Each service's fixtures live in their own plugin module."""

pytest_plugins = [
    "tests.fixtures_models",
    "tests.fixtures_pg",
    "tests.fixtures_kafka",
]
