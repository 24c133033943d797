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


def passes_and_options(pipeline_text):
    return [(p.name, p.options) for p in bench.parse_pipeline(pipeline_text)]


@pytest.mark.parametrize("removed", bench.ABLATED_PASSES)
def test_ablation_leaves_out_exactly_one_pass(removed):
    default = passes_and_options(targets.TARGETS["htp"].pipeline_text())
    (variant,) = [v for v in bench.ablation_variants() if v.config == f"htp W8A8 -{removed}"]
    assert variant.tool == "qcc-w8a8"
    assert removed in [name for name, _ in default]
    # The others in order, each with the default pipeline's options (adaround's iterations, ...).
    assert passes_and_options(variant.passes) == [(n, o) for n, o in default if n != removed]


def test_ablation_swaps_the_calibration_method_only():
    default = targets.TARGETS["htp"].pipeline_text()
    assert "calibrate{method=percentile act-bits=8}" in default
    calib_rows = {v.config: v.passes for v in bench.ablation_variants() if "calib=" in v.config}
    assert list(calib_rows) == ["htp W8A8 calib=minmax", "htp W8A8 calib=mse", "htp W8A8 calib=auto"]
    for config, text in calib_rows.items():
        ablated, reference = passes_and_options(text), passes_and_options(default)
        assert [n for n, _ in ablated] == [n for n, _ in reference]
        assert [p for p in ablated if p[0] != "calibrate"] == [p for p in reference if p[0] != "calibrate"]
        (calibrate,) = [o for n, o in ablated if n == "calibrate"]
        assert (calibrate.method, calibrate.act_bits) == (config.split("=")[1], 8)


@pytest.mark.parametrize("name", ["no-such-pass", "pad-channels"])
def test_leaving_out_an_absent_pass_is_an_error(name):
    with pytest.raises(bench.QccError, match=f"no pass '{name}'"):
        bench.without_pass(targets.TARGETS["htp"].pipeline_text(), name)
