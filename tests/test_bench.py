"""tools/bench.py: sample selection, variants, metrics and the missing-target check (the full run is a tool, not a test)."""
import dataclasses

import numpy as np
import pytest

from compiler import targets
from tools import bench, bench_process


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


def test_rec_agreement_is_the_share_of_time_steps_with_the_same_character():
    ref = np.zeros((1, 4, 5))
    ref[0, np.arange(4), [1, 2, 3, 0]] = 1.0   # characters 1 2 3 blank
    got = ref.copy()
    got[0, 2] = 0.0
    got[0, 2, 4] = 1.0                         # the third step reads character 4
    result = bench.accuracy([{"probs": ref}], [{"probs": got}], [0], "chars")
    assert result["task_metric"] == pytest.approx(3 / 4)


def test_missing_htp_target_fails_clearly(monkeypatch):
    monkeypatch.delitem(targets.TARGETS, "htp", raising=False)
    with pytest.raises(SystemExit, match="no 'htp' target.*--tools ort-minmax"):
        bench.require_htp_target()


def passes_and_options(pipeline_text):
    return [(p.name, p.options) for p in bench.parse_pipeline(pipeline_text)]


def ablation_rows(tools):
    return [bench.variant(spec) for spec in bench.ablation_specs(tools)]


@pytest.mark.parametrize("tool, bits", bench.QCC_TOOLS.items())
@pytest.mark.parametrize("toggled", bench.ABLATED_PASSES)
def test_ablation_toggles_exactly_one_pass(tool, bits, toggled):
    default = passes_and_options(str(targets.TARGETS["htp"].build(act_bits=bits)))
    in_default = toggled in [name for name, _ in default]
    width = {8: "W8A8", 16: "W8A16"}[bits]
    (row,) = [v for v in ablation_rows([tool]) if v.config == f"htp {width} {'-' if in_default else '+'}{toggled}"]
    assert row.tool == tool
    ablated = passes_and_options(row.passes)
    assert (toggled in [name for name, _ in ablated]) != in_default
    # The others in order, each with the default pipeline's options (adaround's iterations, act-bits, ...).
    assert [(n, o) for n, o in ablated if n != toggled] == [(n, o) for n, o in default if n != toggled]


@pytest.mark.parametrize("tool, bits", bench.QCC_TOOLS.items())
def test_ablation_swaps_the_calibration_method_only(tool, bits):
    default = str(targets.TARGETS["htp"].build(act_bits=bits))
    default_method = targets.width_defaults(bits).calib_method
    assert f"calibrate{{method={default_method} " in default and f"quant{{act-bits={bits} " in default
    calib_rows = {v.config.split("=")[1]: v.passes for v in ablation_rows([tool]) if "calib=" in v.config}
    assert list(calib_rows) == [m for m in ("minmax", "percentile", "mse", "auto") if m != default_method]
    for method, text in calib_rows.items():
        ablated, reference = passes_and_options(text), passes_and_options(default)
        assert [p for p in ablated if p[0] != "calibrate"] == [p for p in reference if p[0] != "calibrate"]
        (calibrate,) = [o for n, o in ablated if n == "calibrate"]
        assert calibrate.method == method and bench.parse_pipeline(text).config.act_bits == bits


def test_ablation_rows_follow_the_selected_qcc_tools():
    assert {v.tool for v in ablation_rows(["qcc-w8a16", "ort-minmax"])} == {"qcc-w8a16"}
    assert {v.tool for v in ablation_rows(["qcc-w8a8", "qcc-w8a16"])} == {"qcc-w8a8", "qcc-w8a16"}
    assert ablation_rows(["ort-qnn"]) == []
    with pytest.raises(SystemExit):
        bench.parse_args(["--ablation", "--tools", "ort-minmax"])


def test_a_pass_the_default_leaves_out_is_ablated_by_adding_it(monkeypatch):
    monkeypatch.setitem(targets.WIDTH_DEFAULTS, 8, targets.WidthDefaults("minmax", frozenset({"cle"})))
    full = passes_and_options(str(targets.TARGETS["htp"].build(left_out=frozenset())))
    assert "cle" not in [n for n, _ in passes_and_options(str(targets.TARGETS["htp"].build()))]
    (row,) = [v for v in ablation_rows(["qcc-w8a8"]) if "cle" in v.config]
    assert row.config == "htp W8A8 +cle"
    expected = [(n, o if n != "calibrate" else dataclasses.replace(o, method="minmax")) for n, o in full]
    assert passes_and_options(row.passes) == expected


def test_a_variant_combines_changes(monkeypatch):
    monkeypatch.setitem(targets.WIDTH_DEFAULTS, 16, targets.WidthDefaults("minmax", frozenset({"adaround"})))
    row = bench.variant("W8A16 calib=mse -cle +adaround")
    full = passes_and_options(str(targets.TARGETS["htp"].build(act_bits=16, left_out=frozenset())))
    assert [n for n, _ in passes_and_options(row.passes)] == [n for n, _ in full if n != "cle"]
    assert "calibrate{method=mse " in row.passes and row.passes.startswith("quant{act-bits=16 ")
    assert (row.tool, row.config, row.name) == ("qcc-w8a16", "htp W8A16 calib=mse -cle +adaround",
                                                "qcc-w8a16-calib-mse-no-cle-with-adaround")


def test_a_judge_variant_compiles_as_qcc_compile_judge_on_the_arch_given():
    row = bench.variant("W8A8 judge=htp arch=68")
    assert row.judge == "htp" and row.name == "qcc-w8a8-judge-htp-v68"
    assert row.passes.startswith("quant{") and "htp-arch=68" in row.passes
    assert bench.variant("W8A8").judge is None


def test_a_bias_variant_changes_only_bias_corrections_mode():
    for width, bits in (("W8A8", 8), ("W8A16", 16)):
        default = passes_and_options(str(targets.TARGETS["htp"].build(act_bits=bits)))
        other = "empirical" if targets.width_defaults(bits).tuning.get("bias-correction") else "sequential"
        row = bench.variant(f"{width} bias={other}")
        samples = {"sequential": 4, "empirical": 8}[other]  # the sample count of the width that uses the mode
        expected = [(n, dataclasses.replace(o, mode=other, samples=samples) if n == "bias-correction" else o)
                    for n, o in default]
        assert passes_and_options(row.passes) == expected
        assert f"{width} bias={other}" in bench.ablation_specs([bench.WIDTH_TOOLS[width]])


def test_a_mixed_precision_variant_promotes_before_qdq_and_converts_after():
    row = bench.variant("W8A8 cos=0.999 share=0.5")
    names = [n for n, _ in passes_and_options(row.passes)]
    assert names[-3:] == ["promote-16bit", "insert-qdq", "insert-converts"]
    assert "promote-16bit{target-cos=0.999 budget=0.5" in row.passes
    assert row.config == "htp W8A8 cos=0.999 share=0.5"


@pytest.mark.parametrize("spec, message", [
    ("W4A8 -cle", "starts with the width"),
    ("W8A8 share=0.5", "needs cos=C"),
    ("W8A8 cos=high", "needs a number"),
    ("W8A16 cos=0.999", "every activation already has 16 bits"),
    ("W8A8 -pad-channels", "none of calib=METHOD"),
    ("W8A8 -cle -cle", "has no pass 'cle'"),
    ("W8A16 +cle", "already has pass 'cle'"),
    ("W8A8 calib=nearest", "must be one of"),
    ("W8A8 bias=analytical", "must be one of"),
])
def test_a_variant_that_does_not_apply_is_an_error(spec, message):
    with pytest.raises(bench.QccError, match=message):
        bench.variant(spec)


def test_offset_wraps_around_to_make_a_second_fold():
    files = [f"f{i}" for i in range(8)]
    assert bench.fold_files(files, 3, 3, 0) == files[:6]
    second = bench.fold_files(files, 4, 4, 4)
    assert second[:4] == files[4:] and second[4:] == files[:4]
    assert bench.fold_files(files, 2, 3, 6) == ["f6", "f7", "f0", "f1", "f2"]
    for calib, held, offset in ((5, 4, 0), (2, 2, 8)):
        with pytest.raises(ValueError):
            bench.fold_files(files, calib, held, offset)


def test_htp_columns_come_per_architecture():
    args = bench.parse_args(["--htp", "--htp-arch", "68,73,79", "--tools", "ort-minmax"])
    assert args.htp_archs == ["68", "73", "79"]
    row = bench.Row("cls", "qcc", "htp W8A8", compile_seconds=1.0, cos_mean=0.99, cos_min=0.9, sqnr_db=20.0,
                    task="top1", task_metric=1.0)
    row.htp = {"68": {"cos_vs_cpu": 0.991, "max_steps_vs_cpu": 12.0, "cos_vs_fp32": 0.981},
               "73": {"error": "the QNN HTP backend cannot run the whole graph: Conv 'c': Failed to add node."},
               "79": {"cos_vs_cpu": 0.999, "max_steps_vs_cpu": 2.0, "cos_vs_fp32": 0.989}}
    head, _, line = bench.render([row], args.htp_archs).splitlines()
    assert [head.count(f"v{arch} cos/CPU") for arch in ("68", "73", "79")] == [1, 1, 1]
    assert "0.99100     12      0.98100" in line and "HTP refused: the QNN HTP backend cannot run" in line
    assert line.rstrip().endswith("0.98900")
    with pytest.raises(SystemExit):
        bench.parse_args(["--htp", "--htp-arch", "68,v73"])


def test_the_default_w8a8_row_shows_whole_process_time_against_ort():
    rows = [bench.Row("det", "qcc", "htp W8A8", compile_seconds=3.0, cos_mean=0.99, task="iou", task_metric=0.9,
                      process={"qcc": bench_process.Timing(4.5, 4.0), "ort": bench_process.Timing(5.0, 6.0)}),
            bench.Row("det", "ort", "MinMax per-ch QDQ u8/s8", compile_seconds=2.0, cos_mean=0.98, task="iou")]
    head, _, qcc, ort = bench.render(rows, []).splitlines()
    assert head.endswith("process qcc/ORT")
    assert qcc.endswith("0.90 (4.5/5.0 s)") and ort.endswith(" -")
    assert bench.parse_args([]).process_time and not bench.parse_args(["--no-process-time"]).process_time


def test_a_litemp_variant_fixes_a_share_of_layers_and_ours_can_take_its_bytes():
    row = bench.variant("W8A8 litemp=0.1")
    options = dict(passes_and_options(row.passes))["promote-16bit"]
    assert options.layers == 0.1 and row.config == "htp W8A8 litemp=0.1"
    ours = bench.variant("W8A8 cos=0.999 share=litemp")
    assert ours.share_from_litemp
    assert dict(passes_and_options(bench.with_budget(ours.passes, 0.3)))["promote-16bit"].budget == 0.3
    for spec in ("W8A8 litemp=0.1 cos=0.999", "W8A8 litemp=0.1 share=litemp"):
        with pytest.raises(bench.QccError, match="takes no cos=C"):
            bench.variant(spec)
    with pytest.raises(bench.QccError, match="needs cos=C"):
        bench.variant("W8A8 share=litemp")
