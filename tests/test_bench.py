"""tools/bench.py: sample selection, metrics and the missing-target check (the full run is a tool, not a test)."""
import numpy as np
import pytest

from compiler import targets
from tools import bench


def test_samples_with_a_zero_fp32_output_are_left_out():
    outputs = [{"y": np.zeros((1, 4))}, {"y": np.full((1, 4), 0.5)}, {"y": np.full((1, 4), 1e-5)}]
    assert bench.kept_samples(outputs) == [1]


def test_top1_agreement_and_cosine():
    reference = [{"p": np.array([0.9, 0.1])}, {"p": np.array([0.2, 0.8])}]
    candidate = [{"p": np.array([0.8, 0.2])}, {"p": np.array([0.6, 0.4])}]
    result = bench.accuracy(reference, candidate, [0, 1], "top1")
    assert result["task_metric"] == 0.5
    assert result["cos_min"] < result["cos_mean"] < 1


def test_iou_of_thresholded_maps():
    ref = np.zeros((1, 1, 4, 4))
    ref[..., :2, :] = 0.9                      # 8 text pixels
    got = np.zeros((1, 1, 4, 4))
    got[..., 1:3, :] = 0.9                     # 8 pixels, 4 shared
    result = bench.accuracy([{"m": ref}], [{"m": got}], [0], "iou")
    assert result["task_metric"] == pytest.approx(4 / 12)


def test_missing_htp_target_fails_clearly(monkeypatch):
    monkeypatch.delitem(targets.TARGETS, "htp", raising=False)
    with pytest.raises(SystemExit, match="no 'htp' target.*--tools ort-minmax"):
        bench.require_htp_target()
