"""tools/update_golden.py: reports differing dumps with a diff, writes only with --write, scaffolds cases."""
import pytest

from tests import golden_cases as golden
from tools import update_golden


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A golden tree with one copied case, so the real one is never written."""
    source = golden.GOLDEN_ROOT / "fold-affine" / "lab_block"
    case = tmp_path / "fold-affine" / "lab_block"
    case.mkdir(parents=True)
    for name in ("input.onnxtxt", "pipeline.txt", "expected.txt"):
        (case / name).write_text((source / name).read_text())
    monkeypatch.setattr(update_golden, "GOLDEN_ROOT", tmp_path)
    monkeypatch.setattr(update_golden, "REPO", tmp_path)
    monkeypatch.setattr(update_golden, "discover", lambda: golden.discover(tmp_path))
    return case


def test_current_tree_passes(tree, capsys):
    assert update_golden.main([]) == 0
    assert "current" in capsys.readouterr().err


def test_a_stale_dump_is_shown_and_written_only_on_request(tree, capsys):
    expected = tree / "expected.txt"
    current = expected.read_text()
    expected.write_text(current.replace("HardSwish", "Relu"))
    assert update_golden.main(["fold-affine"]) == 1
    out = capsys.readouterr().out
    assert "-%r = Relu(%l1)" in out and "+%r = HardSwish(%l1)" in out
    assert "Relu" in expected.read_text()
    assert update_golden.main(["--write", "fold-affine/lab_block"]) == 0
    assert expected.read_text() == current


def test_unknown_names_and_existing_cases_are_one_line_errors(tree, capsys):
    assert update_golden.main(["no-such-pass"]) == 2
    assert update_golden.main(["--new", "fold-affine/lab_block"]) == 2
    assert update_golden.main(["--new", "just-a-pass"]) == 2
    err = capsys.readouterr().err
    assert "no golden case or pass named no-such-pass" in err and "already exists" in err and "PASS/CASE" in err


def test_new_case_is_scaffolded_and_then_written(tree, capsys):
    assert update_golden.main(["--new", "cleanup/relu_only"]) == 0
    case = tree.parent.parent / "cleanup" / "relu_only"
    assert (case / "pipeline.txt").read_text().strip() == "cleanup"
    assert update_golden.main(["cleanup"]) == 1  # no expected.txt yet
    assert update_golden.main(["--write", "cleanup"]) == 0
    assert "%y = Relu(%x)" in (case / "expected.txt").read_text()
