"""Shared fixtures. Each service's fixtures live in their own plugin module."""

pytest_plugins = [
    "tests.fixtures_models",
    "tests.fixtures_pg",
    "tests.fixtures_kafka",
    "tests.fixtures_s3",
    "tests.media",
]


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests never read or write the user's ~/.cache/patchd (prepared bases, activation caches)."""
    import os

    os.environ["PATCHD_CACHE_DIR"] = str(tmp_path_factory.mktemp("patchd-cache"))
