"""The files a command writes, checked before any work and committed together at the end.

Contract of ``OutputSet``:

- ``add(role, path)`` plans an output. ``check()`` (before the first pass) refuses, with one line naming
  the path: two outputs on one path, an output that is one of the command's inputs, an existing output
  without ``--force``, an output that is a directory, a missing or unwritable folder.
- ``write(role, data)`` stages the bytes in a hidden temporary file beside the destination;
  ``folder(role)`` stages a directory the same way.
- ``commit()`` moves every staged file into place. Existing destinations (``--force``) are first moved
  aside, so if any rename fails, every destination is restored and nothing of the run remains.
- ``discard()`` (also on any exception inside ``with OutputSet(...)``, Ctrl-C included) removes what
  was staged.

New files get the mode the umask gives (``0666 & ~umask``); a file replaced under ``--force`` keeps its
mode. OS failures (full disk, read-only file system, permissions) become ``QccError`` naming the path.
"""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

from compiler.ir import QccError


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode() -> int:
    """0666 without the process's umask bits (what ``open(path, "w")`` would create)."""
    return 0o666 & ~umask()


def os_error(path: Path, exc: OSError) -> QccError:
    return QccError(f"{path}: cannot write ({exc.strerror or type(exc).__name__})")


def write_file(path: Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, so a reader never sees it half
    written; the file keeps the existing file's mode, else takes the umask's."""
    path = Path(path)
    tmp = _temp_file(path, data, _mode_for(path))
    try:
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise os_error(path, exc) from None


def _mode_for(path: Path) -> int:
    """The mode a file written at ``path`` gets: the existing file's, else the umask's."""
    return stat.S_IMODE(path.stat().st_mode) if path.is_file() else default_mode()


def _temp_file(path: Path, data: bytes | str, mode: int) -> Path:
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise os_error(path, exc) from None
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, mode)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise os_error(path, exc) from None
        raise
    return tmp


class OutputSet:
    def __init__(self, *, force: bool = False, inputs: tuple = ()):
        self.force = force
        self.inputs = [Path(p) for p in inputs if p is not None]
        self.paths: dict[str, Path] = {}
        self.folders: set[str] = set()
        self.staged: dict[str, Path] = {}

    def add(self, role: str, path, *, folder: bool = False) -> Path:
        self.paths[role] = Path(path)
        if folder:
            self.folders.add(role)
        return self.paths[role]

    def check(self) -> None:
        seen: dict[Path, str] = {}
        for role, path in self.paths.items():
            resolved = path.resolve()
            if resolved in seen:
                raise QccError(f"{path}: the {role} and the {seen[resolved]} would be written to the same file; "
                               "choose another output name")
            seen[resolved] = role
            for source in self.inputs:
                if source.exists() and resolved == source.resolve():
                    raise QccError(f"{path}: refusing to overwrite the input {source.name} with the {role}; "
                                   "choose another output name")
            parent = path.parent
            if not parent.is_dir():
                raise QccError(f"{path}: output folder '{parent}' does not exist")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise QccError(f"{path}: output folder '{parent}' is not writable")
            if role in self.folders:
                if path.exists() and not path.is_dir():
                    raise QccError(f"{path}: exists and is not a folder (the {role})")
            elif path.is_dir():
                raise QccError(f"{path}: is a folder; the {role} needs a file name")
            if path.exists() and not self.force:
                raise QccError(f"{path}: already exists; pass --force to overwrite it")

    def write(self, role: str, data: bytes | str) -> Path:
        path = self.paths[role]
        self._replace_staged(role, _temp_file(path, data, _mode_for(path)))
        return path

    def folder(self, role: str) -> Path:
        """A staged empty directory that becomes ``paths[role]`` at commit."""
        path = self.paths[role]
        if role not in self.staged:
            try:
                self.staged[role] = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
                os.chmod(self.staged[role], 0o777 & ~umask())
            except OSError as exc:
                raise os_error(path, exc) from None
        return self.staged[role]

    def _replace_staged(self, role: str, tmp: Path) -> None:
        old = self.staged.pop(role, None)
        if old is not None:
            _remove(old)
        self.staged[role] = tmp

    def commit(self) -> list[Path]:
        """Move every staged output into place; all or nothing."""
        asides: list[Path] = []  # one hidden folder per existing destination, holding it until the end
        moved: list[tuple[Path, Path]] = []
        installed: list[Path] = []
        try:
            for role, tmp in self.staged.items():
                dest = self.paths[role]
                if dest.exists():
                    asides.append(Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent)))
                    os.replace(dest, asides[-1] / dest.name)
                    moved.append((asides[-1], dest))
                os.replace(tmp, dest)
                installed.append(dest)
        except OSError as exc:
            for path in installed:
                _remove(path)
            for aside, moved_dest in moved:
                os.replace(aside / moved_dest.name, moved_dest)
            for aside in asides:
                _remove(aside)
            self.discard()
            raise os_error(dest, exc) from None
        for aside in asides:
            _remove(aside)
        self.staged.clear()
        return installed

    def discard(self) -> None:
        for tmp in self.staged.values():
            _remove(tmp)
        self.staged.clear()

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.discard()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
