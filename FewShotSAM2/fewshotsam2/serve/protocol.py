"""What travels between `segment --server` and `fewshotsam2 serve`: the job archive and the API version.

A job is uploaded as one uncompressed tar: `job.json` (the manifest) and the input files under member names the
client makes up (`i0`, `i1/3`, ...). The server never uses a member name, nor any name a client sends, as a path:
it writes each input to a name of its own (`in/<n><suffix>` or `in/<n>/<m>`), with a suffix from a fixed list.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path
from typing import IO, Any, Iterable, Optional

from ..errors import InputError

API_VERSION = 1  # bumped when the endpoints or the archive change: client and server must agree
MANIFEST = "job.json"
# the input and output formats a job may use; a DICOM series travels as a folder of files without names
FILE_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")
SELECTOR = re.compile(r"#[A-Za-z0-9._-]{1,128}\Z")  # DICOM FOLDER#N or FOLDER#SERIES_UID
# segment's flags that name files or belong to the transport: the client never sends them as options, the
# server refuses them (it chooses every path itself and uses its own model files)
LOCAL_FLAGS = ("--query", "--support", "--labels", "--out", "--scores", "--progress", "--quiet", "--server",
               "--token-file", "--checkpoint", "--cache-dir", "--lpips-weights")
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
                names = [(f"i{n}", inputs / f"{n}{e['suffix']}")]
                paths.append(str(names[0][1]))
            elif (e.get("kind") == "dir" and isinstance(e.get("files"), int) and 1 <= e["files"] <= MAX_DICOM_FILES
                  and (e.get("selector") == "" or SELECTOR.match(str(e.get("selector"))))):
                (inputs / str(n)).mkdir()
                names = [(f"i{n}/{m}", inputs / str(n) / str(m)) for m in range(e["files"])]
                paths.append(str(inputs / str(n)) + e["selector"])
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


def option_tokens(args: Any, actions: Iterable[Any]) -> list[str]:
    """The segment options of parsed `args` as flags (for the server's parser): every option that is not a file
    or transport flag, with its value (a store_true flag only when set). `actions`: the segment parser's."""
    tokens: list[str] = []
    for action in actions:
        flags = [f for f in action.option_strings if f.startswith("--")]
        if not flags or flags[0] in LOCAL_FLAGS or action.dest == "help":
            continue
        value = getattr(args, action.dest, None)
        if action.nargs == 0:  # store_true / store_false
            if value != action.default:
                tokens.append(flags[0])
        elif value is not None:
            tokens += [flags[0], str(value)]
    return tokens


def check_option_tokens(tokens: Any) -> list[str]:
    """The server's check of the options a client sent: strings only, and none of the LOCAL_FLAGS."""
    if not isinstance(tokens, list) or not all(isinstance(t, str) and len(t) < 4096 for t in tokens):
        raise InputError("job archive: options must be a list of strings")
    for t in tokens:
        if t.split("=", 1)[0] in LOCAL_FLAGS or (t.startswith("-") and not t.startswith("--") and not _number(t)):
            raise InputError(f"{t.split('=', 1)[0]}: not accepted by a server")
    return tokens


def _number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
