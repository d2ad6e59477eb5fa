"""The Dockerfile checked without Docker (no daemon where the tests run; the image itself was never built here):
every path it copies exists and is not excluded by .dockerignore, its pins are scripts/setup_env.sh's, its
entrypoint is a `serve` the package defines and that refuses to start without a token file and TLS, its health
check asks an endpoint the server answers, and the wheel its `pip install ".[serve]"` builds holds the package."""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from conftest import REPO
from fewshotsam2 import cli

DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: comments dropped, continuation lines joined."""
    out, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        keyword, _, rest = text.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def _ignored(path: str) -> bool:
    """.dockerignore's patterns (Go filepath.Match on the path and its parents; no `!` rules are used here)."""
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "this check does not know exception rules"
    parts = Path(path).parts
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    for pattern in patterns:
        pattern = pattern.rstrip("/")
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatch(part, pattern[3:]) for part in parts):
                return True
        elif any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            return True
    return False


def _setup_env() -> str:
    return (REPO / "scripts" / "setup_env.sh").read_text()


def test_every_copied_path_exists_and_reaches_the_build_context():
    copies = [shlex.split(args) for keyword, args in instructions() if keyword == "COPY"]
    assert copies, "the Dockerfile copies nothing"
    for words in copies:
        assert not any(w.startswith("--from") for w in words)
        for source in words[:-1]:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            assert not _ignored(source), f"COPY {source}: excluded by .dockerignore"
    sources = {s for words in copies for s in words[:-1]}
    # what `pip install .` needs: the project file, the readme it names, and the package folder it finds
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert {"pyproject.toml", project["project"]["readme"], "FewShotSAM2/fewshotsam2"} <= sources
    assert project["tool"]["setuptools"]["package-dir"] == {"": "FewShotSAM2"}
    assert _ignored("Testing/serve/test_serve.py") and not _ignored("FewShotSAM2/fewshotsam2/serve/app.py")


def test_the_pins_are_setup_envs():
    runs = " ".join(args for keyword, args in instructions() if keyword == "RUN")
    setup = _setup_env()
    for package in ("torch", "torchvision"):
        pinned = re.findall(rf"\b{package}==([\w.]+)", runs)
        tested = set(re.findall(rf"\b{package}==([\w.]+)", setup))
        assert len(pinned) == 1 and len(tested) == 1 and pinned[0] in tested, (package, pinned, tested)
    sam2 = re.findall(r"sam2==([\w.]+) --hash=sha256:([0-9a-f]{64})", runs)
    assert sam2 and set(sam2) == set(re.findall(r"sam2==([\w.]+) --hash=sha256:([0-9a-f]{64})", setup))
    assert "SAM2_BUILD_CUDA=0" in runs and "--require-hashes" in runs
    # the extra it installs pins the Ray Serve that setup_env installs and the tests ran on
    assert re.search(r'pip install "\.\[serve\]"', runs)
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    ray = re.findall(r"ray\[serve\]==([\w.]+)", setup)
    assert extras["serve"] == [f"ray[serve]=={ray[0]}"] and len(set(ray)) == 1
    base = next(args for keyword, args in instructions() if keyword == "FROM")
    version = re.match(r"python:(\d+)\.(\d+)", base)
    assert version and (int(version[1]), int(version[2])) >= (3, 10)  # requires-python >= 3.10


def test_the_entrypoint_is_serve_and_refuses_to_listen_openly(capsys):
    steps = instructions()
    entry = next(__import__("json").loads(args) for keyword, args in steps if keyword == "ENTRYPOINT")
    assert entry[:2] == ["fewshotsam2", "serve"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["fewshotsam2"] == "fewshotsam2.cli:main"
    # without the token file and TLS the docker run line adds, the entrypoint refuses (0.0.0.0 is not loopback)
    assert cli.main(entry[1:]) == 2
    assert "--token-file" in capsys.readouterr().err.strip().splitlines()[-1]
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    health = next(args for keyword, args in steps if keyword == "HEALTHCHECK")
    assert "127.0.0.1:8000/healthz" in health and "--port\", \"8000" in DOCKERFILE.read_text()
    assert "/healthz" in (REPO / "FewShotSAM2" / "fewshotsam2" / "serve" / "app.py").read_text()


@pytest.mark.slow
def test_pip_install_builds_a_wheel_with_the_whole_package(tmp_path):
    """`pip install ".[serve]"` of the copied files: the wheel it builds (here without build isolation: no
    download) holds every file of the package folder."""
    context = tmp_path / "context"
    for source in ("pyproject.toml", "README.md", "LICENSE", "FewShotSAM2/fewshotsam2"):
        target = context / source
        target.parent.mkdir(parents=True, exist_ok=True)
        src = REPO / source
        if src.is_dir():
            import shutil

            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            target.write_bytes(src.read_bytes())
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "wheel"), str(context)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    wheel = next((tmp_path / "wheel").glob("fewshotsam2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    package = REPO / "FewShotSAM2"
    expected = {p.relative_to(package).as_posix() for p in (package / "fewshotsam2").rglob("*")
                if p.is_file() and "__pycache__" not in p.parts}
    assert expected and expected <= names, sorted(expected - names)[:10]
    assert "Provides-Extra: serve" in metadata and "ray[serve]==2.60.0" in metadata
    assert "fewshotsam2 = fewshotsam2.cli:main" in entry_points
