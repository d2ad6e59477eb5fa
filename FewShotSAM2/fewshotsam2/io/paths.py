"""Never write over an input: every command checks its outputs against its inputs before any work.

An output "is" an input when both resolve to the same file (`os.path.realpath`, so `dir/../q.nii.gz` and
symlinks count) or, when both exist, are the same inode (`os.path.samefile`: hard links, case-insensitive file
systems). An output folder may not be an input folder nor lie inside one, and an output file may not replace an
existing file inside an input folder (a DICOM series folder holds the input's files). Outputs must also differ
from each other.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Union

from fewshotsam2.errors import InputError

PathLike = Union[str, "os.PathLike[str]"]


def _real(path: PathLike) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(os.fspath(path))))


def _same(a: PathLike, b: PathLike) -> bool:
    if _real(a) == _real(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def _inside(child: str, folder: str) -> bool:
    return child != folder and os.path.commonpath([child, folder]) == folder


def input_path(spec: PathLike) -> str:
    """The file or folder an input argument names (drops a `folder#SeriesInstanceUID` DICOM series choice)."""
    text = os.fspath(spec)
    if "#" in text and not os.path.exists(text):
        return text.split("#", 1)[0]
    return text


def refuse_overwriting_inputs(
    outputs: Iterable[tuple[str, Optional[PathLike]]],
    inputs: Iterable[Optional[PathLike]],
    output_folders: Iterable[tuple[str, Optional[PathLike]]] = (),
) -> None:
    """Raise InputError if an output would replace or write into an input, or two outputs are one path.

    `outputs`: (option name, path) of output *files*, e.g. ("--out", "seg.nii.gz"); None entries are skipped.
    `inputs`: input files or folders (DICOM series folders, case folders); None entries are skipped.
    `output_folders`: (option name, path) of output *folders* (evaluate's results folder): refused when they
    are an input, or lie inside an input folder. A folder that merely contains the inputs is fine: only the
    command's own file names are written into it, and each of those is a file output to check too.
    Call it before reading anything large and before building SAM2.
    """
    ins = [input_path(p) for p in inputs if p is not None and os.fspath(p) != ""]
    files = [(name, os.fspath(p)) for name, p in outputs if p is not None]
    folders = [(name, os.fspath(p)) for name, p in output_folders if p is not None]
    for name, out in files:
        for inp in ins:
            if _same(out, inp):
                raise InputError(f"{name} {out} is the input {inp}: writing it would destroy the input; "
                                 "choose another output name")
            real_in, real_out = _real(inp), _real(out)
            if os.path.isdir(real_in) and _inside(real_out, real_in) and os.path.lexists(out):
                raise InputError(f"{name} {out} would replace a file inside the input folder {inp}; "
                                 "choose another output name or folder")
    for name, out in folders:
        real_out = _real(out)
        for inp in ins:
            real_in = _real(inp)
            if _same(out, inp) or (os.path.isdir(real_in) and _inside(real_out, real_in)):
                raise InputError(f"{name} {out} is or lies inside the input {inp}: results would be mixed with "
                                 "the input's files; choose another output folder")
    named = files + folders
    for i, (name_a, a) in enumerate(named):
        for name_b, b in named[i + 1:]:
            if _same(a, b):
                raise InputError(f"{name_a} and {name_b} are the same path ({a}); give each output its own name")



def dash_path_hint(argv: Iterable[str]) -> str:
    """For a command-line error: a path that starts with '-' reads as an option; say to write it ./-name."""
    for a in argv:
        if a.startswith("-") and a != "-" and os.path.lexists(input_path(a)):
            return f" (the path {a} starts with '-', which reads as an option: write ./{a})"
    return ""

def check_name_length(path: PathLike) -> None:
    """Refuse a file name longer than the folder's file system allows (the write would fail after the work)."""
    p = Path(path)
    folder = p.parent if str(p.parent) else Path(".")
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    size = len(os.fsencode(p.name))
    if size > name_max:
        raise InputError(f"{p.name[:40]}...: file name too long for the file system ({size} bytes, at most "
                         f"{name_max}); choose a shorter name")


def check_output_file(path: PathLike, suffix: str) -> None:
    """A file output with a fixed suffix (`--scores x.csv`) can be written: right suffix, not a folder, its folder
    exists and is writable. Checked before any work."""
    p = Path(path)
    check_name_length(p)
    if p.is_dir():
        raise InputError(f"{path}: is a folder; give a {suffix} file name")
    if p.suffix.lower() != suffix:
        raise InputError(f"{path}: expected a {suffix} file name")
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise InputError(f"cannot write {path}: folder {folder} is not writable")


def writable_cache_folder(where: PathLike) -> Path:
    """The feature cache's folder, made if missing and checked writable (pure Python: the `serve` driver checks it
    before Ray starts and never imports torch); one InputError when it cannot be used."""
    path = Path(where).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot use feature cache folder {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK):
        raise InputError(f"feature cache folder {path} is not writable (give another with --feature-cache, "
                         "or --feature-cache off)")
    return path
