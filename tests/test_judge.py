"""--judge sim|htp chooses calibration method and bias-correction mode on calibration samples held back from
calibration; without --eval-data, qcc compile holds a quarter of the samples back to evaluate and check on."""
import json

import numpy as np
import onnx
import pytest

from compiler import judge
from compiler.cli import main
from compiler.errors import QccError
from compiler.ir import from_onnx, infer_shapes
from compiler.quantize import compile_model, evaluate
from compiler.targets import get_target
from tests.conftest import CONV_MODEL


def conv_module():
    return from_onnx(infer_shapes(onnx.parser.parse_model(CONV_MODEL)))


def samples(count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(count)]


def test_candidates_vary_method_and_mode_with_the_pipeline_as_given_first():
    pipeline = get_target("htp").build()
    labels = [c.label for c in judge.candidates(pipeline)]
    assert labels[0] == "calibrate=mse bias-correction=sequential"
    assert len(labels) == len(set(labels)) == 9
    assert {label.split()[0] for label in labels} == {"calibrate=mse", "calibrate=percentile", "calibrate=minmax"}
    assert {label.split()[1] for label in labels} == {f"bias-correction={m}" for m in ("sequential", "empirical", "none")}
    none = next(c for c in judge.candidates(pipeline) if c.label.endswith("none"))
    assert none.pipeline.find("bias-correction") is None
    assert str(none.pipeline).startswith("quant{") and none.pipeline.config == pipeline.config
    # Every other pass is the pipeline's own, in its order.
    assert [p.name for p in none.pipeline] == [p.name for p in pipeline if p.name != "bias-correction"]


def test_a_fixed_method_and_mixed_precision_narrow_the_candidates():
    from compiler.quantize import with_mixed_precision
    pipeline = with_mixed_precision(get_target("htp").build(), 0.999)
    labels = [c.label for c in judge.candidates(pipeline, fixed_method="percentile")]
    # Sequential bias correction simulates one width: not beside promote-16bit.
    assert labels == ["calibrate=percentile bias-correction=empirical", "calibrate=percentile bias-correction=none"]


def test_auto_pairs_the_8_bit_default_with_percentile_and_the_empirical_correction():
    pipeline = get_target("htp").build()
    assert [c.label for c in judge.pair(pipeline)] == ["calibrate=mse bias-correction=sequential",
                                                       "calibrate=percentile bias-correction=empirical"]
    paired = judge.pair(pipeline)[1].pipeline
    assert [c.label for c in judge.pair(paired)] == ["calibrate=percentile bias-correction=empirical"]


def test_auto_judges_a_targets_8_bit_pipeline_from_8_samples_on():
    chose = lambda count, **options: compile_model(conv_module(), "htp", calib_data=samples(count), judge="auto",
                                                   **options).judge
    report = chose(8)
    assert report["by"] == "CPU simulation" and [row["candidate"] for row in report["candidates"]] == [
        "calibrate=mse bias-correction=sequential", "calibrate=percentile bias-correction=empirical"]
    # What the user fixed, or a pipeline it does not pair, is compiled as is (and nothing is held back for it).
    for count, options in ((7, {}), (8, {"calib_method": "minmax"}), (8, {"act_bits": 16}),
                           (8, {"passes": "calibrate,bias-correction,propagate-encodings,insert-qdq"})):
        assert chose(count, **options) == {}
    assert len(compile_model(conv_module(), "htp", calib_data=samples(8), judge="auto",
                             calib_method="minmax").context.calib_data) == 8


def test_qcc_compile_judges_by_default_and_not_with_judge_off(work, capsys):
    write_samples(work / "eight", 8)
    assert main(["compile", str(work / "m.onnx"), "-o", str(work / "o.onnx"), "--target", "htp", "--no-htp-check",
                 "--calib-data", str(work / "eight")]) == 0
    assert "chosen of 2 candidates" in capsys.readouterr().err
    assert json.loads((work / "o.report.json").read_text())["judge"]["by"] == "CPU simulation"
    assert main(["compile", str(work / "m.onnx"), "-o", str(work / "o.onnx"), "--target", "htp", "--no-htp-check",
                 "--calib-data", str(work / "eight"), "--judge", "off", "--force"]) == 0
    assert "judge" not in capsys.readouterr().err
    assert "judge" not in json.loads((work / "o.report.json").read_text())


def test_a_float_pipeline_has_nothing_to_judge():
    with pytest.raises(QccError, match="does not quantize"):
        judge.candidates(get_target("cpu").build())


def test_held_back_samples_beyond_the_memory_budget_are_run_again_not_kept(monkeypatch):
    data = samples(6)
    reference = conv_module().to_onnx()
    first = judge.HeldBack(data, reference)
    sizes = first[0][0]["x"].nbytes + sum(v.nbytes for v in first[0][1].values())
    monkeypatch.setattr(judge, "HELD_BACK_MEMORY", 2 * sizes)
    held = judge.HeldBack(data, reference)
    pairs = [held[i] for i in range(6)]
    assert sorted(held.kept) == [0, 1] and held.bytes == 2 * sizes
    again = held[5]
    assert again[1].keys() == pairs[5][1].keys()
    assert all(np.array_equal(again[1][name], pairs[5][1][name]) for name in again[1])
    assert held.kept[0] is held[0]  # kept ones are not run again


def test_a_challenger_must_win_by_more_than_the_noise_of_the_paired_differences():
    best = np.array([0.990, 0.995, 0.980, 0.999])
    assert judge.beats(best + 0.001, best)  # the same gain on every sample: no noise at all
    assert not judge.beats(best, best)
    noisy = best + np.array([0.004, -0.003, 0.003, -0.002])  # mean +0.0005, standard error 0.0018
    assert np.mean(noisy) > np.mean(best) and not judge.beats(noisy, best)
    assert judge.beats(best + np.array([0.004, 0.003, 0.005, 0.002]), best)



def test_a_challenger_must_also_win_by_more_than_the_least_gain_asked():
    best = np.array([0.99990, 0.99995, 0.99992, 0.99999])
    consistent = best + np.array([0.00007, 0.00006, 0.00008, 0.00007])  # no noise, but a small gain
    assert judge.beats(consistent, best) and not judge.beats(consistent, best, min_gain=1e-4)
    assert judge.beats(best + 0.0002, best, min_gain=1e-4)


def test_the_judge_keeps_the_candidate_that_wins_clearly_on_held_back_samples():
    data = samples(8)
    module = conv_module()
    result = compile_model(module, "htp", calib_data=data, judge="sim")
    report = result.judge
    assert report["by"] == "CPU simulation" and report["samples"] == 2 and result.held_back == 2
    assert len(result.context.calib_data) == 6
    rows = report["candidates"]
    assert all(len(row["per_sample"]) == 2 and row["cosine"] == pytest.approx(np.mean(row["per_sample"])) for row in rows)
    winner = rows[0]
    for row in rows[1:]:
        if judge.beats(np.array(row["per_sample"]), np.array(winner["per_sample"])):
            winner = row
    assert report["chosen"] == winner["candidate"] and report["cosine"] == winner["cosine"]
    assert str(result.manager.pipeline) == winner["pipeline"]
    # The score is the written model's cosine on the held-back samples, recomputed here from scratch.
    held = [data[i] for i in (3, 7)]
    rescored = judge.score(result.module.to_onnx(), judge.HeldBack(held, result.reference.to_onnx()), "sim", None)[0]
    assert report["cosine"] == pytest.approx(np.mean(rescored))
    # The held-back samples are also what the compile reports on: the same numbers as evaluating afresh.
    assert result.metrics == evaluate(result.reference, result.module, held)
    # The chosen candidate went through every pass of its pipeline (the shared first ones once, before the rest).
    assert [r.name for r in result.manager.records] == [p.name for p in result.manager.pipeline]
    assert any(node.op == "QuantizeLinear" for node in result.module.graph.nodes)
    # The module given is left as it was: every candidate ran on a copy.
    assert not any(node.op == "QuantizeLinear" for node in module.graph.nodes)


def test_the_judge_needs_samples_to_hold_back():
    with pytest.raises(QccError, match="at least 4 calibration samples"):
        compile_model(conv_module(), "htp", calib_data=samples(3), judge="sim")
    with pytest.raises(QccError, match="needs --calib-data"):
        compile_model(conv_module(), "htp", judge="sim")
    with pytest.raises(QccError, match="not one of auto, off, sim, htp"):
        compile_model(conv_module(), "htp", calib_data=samples(8), judge="device")


def test_held_back_samples_calibrate_nothing_and_are_evaluated():
    data = samples(8)
    held_back = compile_model(conv_module(), "htp", calib_data=data, hold_back=True)
    assert len(held_back.context.calib_data) == 6 and held_back.held_back == 2
    (metrics,) = held_back.metrics.values()
    assert metrics["samples"] == 2
    calibrated_on_six = compile_model(conv_module(), "htp", calib_data=[data[i] for i in (0, 1, 2, 4, 5, 6)])
    assert held_back.module.to_onnx().SerializeToString() == calibrated_on_six.module.to_onnx().SerializeToString()
    # Too few to spare any: all calibrate.
    assert len(compile_model(conv_module(), "htp", calib_data=data[:3], hold_back=True).context.calib_data) == 3


def write_samples(folder, count):
    folder.mkdir()
    for i, sample in enumerate(samples(count)):
        np.save(folder / f"s{i}.npy", sample["x"])


def test_compile_without_eval_data_checks_on_held_back_calibration_samples(work, capsys):
    write_samples(work / "eight", 8)
    assert main(["compile", str(work / "m.onnx"), "-o", str(work / "o.onnx"), "--target", "htp", "--no-htp-check",
                 "--calib-data", str(work / "eight")]) == 0
    err = capsys.readouterr().err
    assert "vs FP32 on 2 held-back calibration sample(s)" in err
    document = json.loads((work / "o.report.json").read_text())
    assert document["held_back_samples"] == 2 and document["calibration_samples"] == 6
    # Given --eval-data, and nothing to judge, every calibration sample calibrates.
    assert main(["compile", str(work / "m.onnx"), "-o", str(work / "o.onnx"), "--target", "htp", "--no-htp-check",
                 "--calib-data", str(work / "eight"), "--eval-data", str(work / "data"), "--force", "-q",
                 "--judge", "off"]) == 0
    document = json.loads((work / "o.report.json").read_text())
    assert document["held_back_samples"] == 0 and document["calibration_samples"] == 8


def test_judge_htp_chooses_on_the_backend_of_the_generation(work, capsys):
    pytest.importorskip("onnxruntime_qnn")
    write_samples(work / "eight", 8)
    assert main(["compile", str(work / "m.onnx"), "-o", str(work / "o.onnx"), "--target", "htp", "--htp-arch", "68",
                 "--judge", "htp", "--calib-data", str(work / "eight"), "--htp-samples", "1"]) == 0
    err = capsys.readouterr().err
    assert "judge 9/9 (HTP v68)" in err and "chosen of 9 candidates" in err
    document = json.loads((work / "o.report.json").read_text())
    assert document["judge"]["by"] == "HTP v68" and len(document["judge"]["candidates"]) == 9
    assert document["pipeline"] == next(row["pipeline"] for row in document["judge"]["candidates"]
                                        if row["candidate"] == document["judge"]["chosen"])
    assert document["htp"]["data"] == "held-back calibration sample(s), which also chose the pipeline (--judge)"


def test_judge_htp_needs_an_htp_target(work, capsys):
    write_samples(work / "eight", 8)
    assert main(["compile", str(work / "m.onnx"), "-o", str(work / "o.onnx"), "--target", "dsp", "--judge", "htp",
                 "--calib-data", str(work / "eight")]) == 2
    assert "--judge htp needs an HTP generation" in capsys.readouterr().err
