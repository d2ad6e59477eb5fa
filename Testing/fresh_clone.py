"""What a new user has: a clone with no ../shared beside it and an empty home folder; and a local HTTP server
standing in for the public addresses (a mirror of the pinned files, on 127.0.0.1)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import threading
from pathlib import Path
from typing import Iterator

from conftest import REPO


def make_fresh_clone(tmp_path: Path, with_scripts: bool = False) -> tuple[Path, dict]:
    """A copy of the code in a folder with no ../shared beside it, and an environment with an empty HOME."""
    from fewshotsam2.io import sample_data as sd

    clone = tmp_path / "clone"
    shutil.copytree(REPO / "FewShotSAM2", clone / "FewShotSAM2",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (clone / "Testing").mkdir(parents=True)
    shutil.copy(REPO / "Testing" / "conftest.py", clone / "Testing")
    shutil.copy(REPO / "pyproject.toml", clone)
    if with_scripts:
        shutil.copytree(REPO / "scripts", clone / "scripts")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CI", sd.DATA_ENV, sd.URL_ENV, "PYTHONPATH")}
    env.update(HOME=str(home), PYTHONPATH=str(clone / "FewShotSAM2"), OMP_NUM_THREADS="1")
    assert not (clone.parent / "shared").exists()
    return clone, env


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serve_folder(root: Path) -> Iterator[str]:
    """Serve `root` over HTTP on 127.0.0.1; yields the base URL."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def mirror_sample_data(shared_data: Path, root: Path) -> None:
    """Lay out the demo files as the source repository has them (its tests/reference_files folder)."""
    from fewshotsam2.io import sample_data as sd

    for f in sd.DEMO_FILES:
        (root / f.filename).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_data / f.path, root / f.filename)
