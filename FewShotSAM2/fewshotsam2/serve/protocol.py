"""What travels between `segment --server` and `fewshotsam2 serve`: the job archive and the API version.

A job is uploaded as one uncompressed tar: `job.json` (the manifest) and the input files under member names the
client makes up (`i0`, `i1/3`, ...). The server never uses a member name, nor any name a client sends, as a path:
it writes each input to a name of its own (`in/input<n><suffix>` or `in/input<n>/<m>`), with a suffix from a fixed list.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path
from typing import IO, Any, Optional

from fewshotsam2.errors import InputError
from fewshotsam2.settings import SETTINGS

API_VERSION = 1  # bumped when the endpoints or the archive change: client and server must agree
MANIFEST = "job.json"
# the input and output formats a job may use; a DICOM series travels as a folder of files without names
FILE_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")
SELECTOR = re.compile(r"#[A-Za-z0-9._-]{1,128}\Z")  # DICOM FOLDER#N or FOLDER#SERIES_UID
# settings that name files of the client's machine: never sent, refused by the server (it uses its own model files)
LOCAL_SETTINGS = ("checkpoint", "cache_dir", "lpips_weights", "extent_weights")
MAX_DICOM_FILES = 5000


def file_suffix(name: str) -> Optional[str]:
    """The suffix of `name` from FILE_SUFFIXES (lower case), or None."""
    low = name.lower()
    return next((s for s in FILE_SUFFIXES if low.endswith(s)), None)


def split_selector(path: str) -> tuple[str, str]:
    """`FOLDER#2` -> (`FOLDER`, `#2`); a path without a valid selector -> (path, "")."""
    head, sep, tail = path.rpartition("#")
    if sep and SELECTOR.match("#" + tail) and not Path(path).exists():
        return head, "#" + tail
    return path, ""


def pack_job(out: IO[bytes], inputs: list[str], manifest: dict[str, Any]) -> None:
    """Write the job archive to `out`: the manifest plus each input (a file, or a DICOM folder's files).

    `manifest` refers to inputs by their index in `inputs`; `inputs[n]` may carry a DICOM `#selector`.
    """
    entries = []
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for n, given in enumerate(inputs):
            path, selector = split_selector(given)
            p = Path(path)
            if p.is_dir():
                files = sorted(f for f in p.iterdir() if f.is_file())
                if not files:
                    raise InputError(f"{path}: empty folder")
                if len(files) > MAX_DICOM_FILES:
                    raise InputError(f"{path}: more than {MAX_DICOM_FILES} files")
                for m, f in enumerate(files):
                    tar.add(str(f), arcname=f"i{n}/{m}", recursive=False)
                entries.append({"kind": "dir", "files": len(files), "selector": selector})
            elif p.is_file():
                suffix = file_suffix(p.name)
                if suffix is None or selector:
                    raise InputError(f"{path}: a server takes {', '.join(FILE_SUFFIXES)} files or DICOM folders")
                tar.add(str(p), arcname=f"i{n}", recursive=False)
                entries.append({"kind": "file", "suffix": suffix})
            else:
                raise InputError(f"{path}: no such file or folder")
        data = json.dumps({**manifest, "api": API_VERSION, "inputs": entries}).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def unpack_job(archive: Path, folder: Path) -> tuple[dict[str, Any], list[str]]:
    """Read a job archive into `folder` (which must exist and be empty); returns (manifest, input paths).

    Member names only pick which bytes go where; every written name is the server's own. Raises InputError for
    anything unexpected (links, devices, unknown members, a manifest that does not match the members).
    """
    with tarfile.open(archive, mode="r:") as tar:
        members = {m.name: m for m in tar.getmembers()}
        for m in members.values():
            if not m.isfile():
                raise InputError(f"job archive: {m.name!r} is not a plain file")
        if MANIFEST not in members or members[MANIFEST].size > 1 << 20:
            raise InputError("job archive: no job.json")
        try:
            manifest = json.loads(tar.extractfile(members[MANIFEST]).read())
        except (ValueError, UnicodeDecodeError):
            raise InputError("job archive: job.json is not JSON") from None
        if not isinstance(manifest, dict) or manifest.get("api") != API_VERSION:
            raise InputError(f"job archive: API version {manifest.get('api') if isinstance(manifest, dict) else '?'}"
                             f", this server speaks {API_VERSION}")
        entries = manifest.get("inputs")
        if not isinstance(entries, list) or not 1 <= len(entries) <= 64:
            raise InputError("job archive: bad input list")
        expected = {MANIFEST}
        paths = []
        inputs = folder / "in"
        inputs.mkdir()
        for n, e in enumerate(entries):
            if not isinstance(e, dict):
                raise InputError("job archive: bad input entry")
            if e.get("kind") == "file" and e.get("suffix") in FILE_SUFFIXES:
                names = [(f"i{n}", inputs / f"input{n}{e['suffix']}")]
                paths.append(str(names[0][1]))
            elif (e.get("kind") == "dir" and isinstance(e.get("files"), int) and 1 <= e["files"] <= MAX_DICOM_FILES
                  and (e.get("selector") == "" or SELECTOR.match(str(e.get("selector"))))):
                (inputs / f"input{n}").mkdir()
                names = [(f"i{n}/{m}", inputs / f"input{n}" / str(m)) for m in range(e["files"])]
                paths.append(str(inputs / f"input{n}") + e["selector"])
            else:
                raise InputError(f"job archive: bad input entry {n}")
            for member, target in names:
                if member not in members:
                    raise InputError(f"job archive: {member} is missing")
                expected.add(member)
                with tar.extractfile(members[member]) as src, open(target, "xb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
        extra = sorted(set(members) - expected)
        if extra:
            raise InputError(f"job archive: unexpected member {extra[0]!r}")
    return manifest, paths


def job_options(args: Any) -> dict[str, Any]:
    """The settings of parsed segment arguments that travel to a server (`settings.SETTINGS` by flat name),
    without the ones that name this machine's files."""
    return {s.name: getattr(args, s.name) for s in SETTINGS if hasattr(args, s.name) and s.name not in LOCAL_SETTINGS}


def check_job_options(options: Any) -> dict[str, Any]:
    """The server's check of the settings a client sent: known flat names with plain values, none that names a
    file. The values themselves are checked by `SegmentOptions` when the job runs (the local messages)."""
    known = {s.name for s in SETTINGS} - set(LOCAL_SETTINGS)
    if not isinstance(options, dict):
        raise InputError("job archive: options must be an object")
    for name, value in options.items():
        if name not in known:
            raise InputError(f"--{str(name).replace('_', '-')[:40]}: not accepted by a server")
        if not (value is None or isinstance(value, (str, int, float, bool))) or len(str(value)) > 4096:
            raise InputError(f"--{name.replace('_', '-')}: not a plain value")
    return options
