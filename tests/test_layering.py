"""Arrows point down (design.md, Layout): commands -> passes -> library. A pass imports the library only,
never another pass; the library imports no pass (the registry's loader aside) and no command."""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Modules that parse a command line or drive a whole run: nothing below them may import them.
COMMANDS = {"compiler.cli", "compiler.arguments", "compiler.quantize", "compiler.analyze_cmd", "compiler.compare_dump",
            "compiler.run_htp_cmd", "compiler.encodings_cmd"}
REGISTRY_LOADER = "compiler.pass_manager"  # imports every pass module by name, so each registers itself


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of the file (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def module_name(path: Path) -> str:
    return f"{path.parent.name}.{path.stem}"


def violations() -> list[str]:
    found = []
    for path in sorted((ROOT / "passes").glob("*.py")):
        for name in sorted(imports(path)):
            if name == "passes" or name.startswith("passes.") or ".".join(name.split(".")[:2]) in COMMANDS:
                found.append(f"{module_name(path)} imports {name}")
    for path in sorted((ROOT / "compiler").glob("*.py")):
        me = module_name(path)
        for name in sorted(imports(path)):
            if (name == "passes" or name.startswith("passes.")) and me != REGISTRY_LOADER:
                found.append(f"{me} imports {name}")
            if me not in COMMANDS and ".".join(name.split(".")[:2]) in COMMANDS:
                found.append(f"{me} (library) imports the command module {name}")
    return found


def test_imports_point_down():
    assert violations() == []


def test_the_check_sees_a_pass_importing_a_pass(tmp_path, monkeypatch):
    fake = tmp_path / "passes"
    fake.mkdir()
    (fake / "a.py").write_text("def f():\n    from passes.b import g\n")
    (tmp_path / "compiler").mkdir()
    (tmp_path / "compiler" / "x.py").write_text("from passes.a import f\nfrom compiler.cli import main\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert set(violations()) == {"passes.a imports passes.b", "passes.a imports passes.b.g", "compiler.x imports passes.a",
                            "compiler.x imports passes.a.f", "compiler.x (library) imports the command module compiler.cli",
                            "compiler.x (library) imports the command module compiler.cli.main"}
