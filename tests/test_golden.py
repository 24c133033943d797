"""Every golden case: the dump matches, the float result holds, a second run changes nothing."""
import numpy as np
import pytest

from tests.golden_cases import all_float_preserving, cosine, discover, golden_context, run_case
from compiler.pass_manager import PassManager, parse_pipeline, verify_outputs
from compiler.runtime import run_model

CASES = discover()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_golden(case, update_golden):
    missing = [p.optional_module for p in parse_pipeline(case.pipeline_text()) if not p.available()]
    if missing:
        pytest.skip(f"{case.id} needs {', '.join(missing)} (an optional extra)")
    original, module, dump, manager = run_case(case)
    if update_golden or not case.expected_path.exists():
        case.expected_path.write_text(dump)
        if not update_golden:
            pytest.fail(f"{case.expected_path} was missing and has been written; review and commit it")
    assert dump == case.expected_path.read_text(), f"dump differs from {case.expected_path} (--update-golden to accept)"

    samples = golden_context(original).calib_data
    if all_float_preserving(manager):
        verify_outputs(original, module, samples, 1e-4, case.id)
    else:
        ref, got = run_model(original, samples), run_model(module, samples)
        for r, g in zip(ref, got):
            for name in r:
                assert np.isfinite(g[name]).all()
                assert cosine(r[name], g[name]) > 0.98, f"{case.id}: output {name} far from float"

    again = PassManager(parse_pipeline(case.pipeline_text()), quiet=True)
    again.run(module, golden_context(original))
    changed = [r.name for r in again.records if r.modified]
    assert not changed, f"second run modified the module in: {changed}"


def test_golden_covers_every_pass():
    from compiler.pass_manager import load_passes
    covered = {c.path.parent.name for c in CASES}
    missing = sorted(set(load_passes()) - covered)
    assert not missing, f"passes without a golden case: {missing}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_golden_input_says_what_it_checks(case):
    first = (case.path / "input.onnxtxt").read_text().splitlines()[0]
    assert first.startswith("# ") and "TODO" not in first, f"{case.id}: the input's first line must say what it checks"
