"""The Python packages the segmentation process needs inside Slicer: checked without importing them, installed
only after the user agreed, sam2 pinned by its hash.

sam2 on PyPI (`sam2==1.1.0`) is published by a third party, not by Meta. Its source archive's `sam2/` package is
byte-identical to Meta's github.com/facebookresearch/sam2 at commit 2b90b9f (15 Dec 2024), so that exact archive
is pinned by its SHA256: pip refuses anything else (`--require-hashes`). It is installed without its dependency
pins (`--no-deps`) and without building its optional CUDA extension (`SAM2_BUILD_CUDA=0`, restored afterwards);
its runtime dependencies are installed by name.

Nothing here imports torch or sam2: the checks read package metadata and look for files, so Slicer's own process
stays free of torch (the segmentation runs in its own process).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

SAM2_VERSION = "1.1.0"
SAM2_SHA256 = "7e0ea252d43c10d853e3acfce0b5770ac683c30481bd6de311300e9d44f45b74"  # sam2-1.1.0.tar.gz on PyPI
SAM2_HASHED_REQUIREMENT = f"sam2=={SAM2_VERSION} --hash=sha256:{SAM2_SHA256}"
SAM2_RUNTIME_REQUIREMENTS = ("hydra-core>=1.3.2", "iopath>=0.1.10", "pillow", "tqdm")
LPIPS_REQUIREMENT = "lpips==0.1.4"
OTHER_REQUIREMENTS = ("scipy", "SimpleITK", "slicerio")
# bounded: below, sam2 1.1.0 does not run; above, an untested major release
TORCH_MINIMUM, TORCH_BELOW = (2, 5, 1), (3,)
TORCH_VERSION_REQUIREMENT = ">=2.5.1,<3"

# import name -> pip name, checked for every method (lpips only for the LPIPS method)
_PACKAGES = (("hydra", "hydra-core"), ("iopath", "iopath"), ("PIL", "pillow"), ("tqdm", "tqdm"),
             ("scipy", "scipy"), ("SimpleITK", "SimpleITK"), ("slicerio", "slicerio"))


def _version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def versionTuple(text: str) -> tuple[int, ...]:
    """(2, 5, 1) for "2.5.1+cu121"; non-numeric parts end the tuple."""
    out = []
    for part in re.split(r"[.+]", text):
        match = re.match(r"\d+", part)
        if not match:
            break
        out.append(int(match.group()))
    return tuple(out)


def torchProblem() -> Optional[str]:
    """Why the installed torch cannot be used, or None if it can (torch is not imported)."""
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    version = _version("torch")
    if version is None:
        return "torch is importable but has no package metadata (a broken installation?)"
    if not (TORCH_MINIMUM <= versionTuple(version) < TORCH_BELOW):
        return f"torch {version} is installed; FewShotSAM2 needs torch {TORCH_VERSION_REQUIREMENT}"
    return None


def sam2Problem() -> Optional[str]:
    """Why the importable sam2 cannot be used, or None if it is sam2 1.1.0 with the SAM2.1 configs.

    Another extension may have installed an older sam2 or put its own copy on sys.path; that would fail later
    with a Hydra error in the middle of a run, so it is refused here with a message.
    """
    spec = importlib.util.find_spec("sam2")  # finds the package without importing it
    if spec is None:
        return "sam2 is not installed"
    folders = [Path(p) for p in (spec.submodule_search_locations or [])]
    version = _version("sam2")
    where = ", ".join(str(f) for f in folders) or str(spec.origin)
    if version != SAM2_VERSION:
        return (f"an incompatible sam2 is installed ({'version ' + version if version else 'no version'}, at {where}), "
                f"perhaps by another extension; FewShotSAM2 needs sam2 {SAM2_VERSION}")
    if not any((folder / "configs" / "sam2.1").is_dir() for folder in folders):
        return f"the sam2 package at {where} has no configs/sam2.1 folder; FewShotSAM2 needs sam2 {SAM2_VERSION} as released"
    return None


def missingDependencies(method: str = "reverse") -> list[str]:
    """What must be installed or fixed before a run, as readable lines (empty: ready). Nothing is imported."""
    problems = []
    torch = torchProblem()
    if torch:
        problems.append(torch)
    elif importlib.util.find_spec("torchvision") is None:
        problems.append("torchvision is not installed")
    sam2 = sam2Problem()
    if sam2:
        problems.append(sam2)
    wanted = list(_PACKAGES) + ([("lpips", LPIPS_REQUIREMENT)] if method == "lpips" else [])
    for module, pipName in wanted:
        if importlib.util.find_spec(module) is None:
            problems.append(f"{pipName} is not installed")
    return problems


def _pipInstall(arguments: list[str]) -> None:
    import slicer

    slicer.util.pip_install(arguments)


def installSam2() -> None:
    """pip-install the hash-pinned sam2 sdist, without its CUDA extension and without its dependency pins."""
    previous = os.environ.get("SAM2_BUILD_CUDA")
    os.environ["SAM2_BUILD_CUDA"] = "0"  # inherited by pip: no CUDA extension to compile
    folder = tempfile.mkdtemp(prefix="FewShotSAM2-pip-")
    requirements = Path(folder) / "sam2-requirements.txt"
    try:
        requirements.write_text(SAM2_HASHED_REQUIREMENT + "\n", encoding="utf-8")
        # --require-hashes: pip checks the downloaded archive against SAM2_SHA256; --no-deps: only sam2 itself
        _pipInstall(["--no-build-isolation", "--no-deps", "--require-hashes", "-r", str(requirements)])
    finally:
        if previous is None:
            os.environ.pop("SAM2_BUILD_CUDA", None)
        else:
            os.environ["SAM2_BUILD_CUDA"] = previous
        requirements.unlink(missing_ok=True)
        os.rmdir(folder)


def installTorch() -> None:
    """torch (and torchvision) through the PyTorch extension's PyTorchUtils, which picks the CUDA build that fits
    the driver; plain pip when that extension is absent. An installed torch of a usable version is kept."""
    installed = _version("torch") if torchProblem() is None else None
    # torchvision for the installed torch: pin torch to itself so that pip does not replace it
    torchRequirement = f"=={installed}" if installed else TORCH_VERSION_REQUIREMENT
    try:
        import PyTorchUtils  # the PyTorch extension (EXTENSION_DEPENDS)
    except ImportError:
        PyTorchUtils = None
    if PyTorchUtils is not None:
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=torchRequirement)
        if torch is None:
            raise RuntimeError("PyTorch was not installed (PyTorch Utils module).")
        return
    logging.info("FewShotSAM2: PyTorch extension not found, installing torch with pip (CPU/CUDA build as pip picks)")
    _pipInstall([f"torch{torchRequirement}", "torchvision"])


# distributions whose module may already be loaded in Slicer's Python and could be replaced by an install
_WATCHED_DISTRIBUTIONS = {"numpy": "numpy", "scipy": "scipy", "PIL": "pillow", "SimpleITK": "SimpleITK",
                          "yaml": "PyYAML", "packaging": "packaging", "tqdm": "tqdm"}


def importedDistributionVersions() -> dict[str, str]:
    """{distribution: installed version} for the watched packages whose module is already imported."""
    versions = {}
    for moduleName, distribution in _WATCHED_DISTRIBUTIONS.items():
        if moduleName in sys.modules:
            version = _version(distribution)
            if version is not None:
                versions[distribution] = version
    return versions


def installDependencies(method: str = "reverse", confirm: Optional[Callable[[str], bool]] = None) -> bool:
    """Install what `missingDependencies` lists, after `confirm(message) -> bool` agrees. Never silent.

    A torch of the wrong version is not replaced (other extensions may depend on it): the user is told what to do.
    Returns True if Slicer should be restarted (a package already imported got another version on disk).
    """
    problems = missingDependencies(method)
    if not problems:
        return False
    torch = torchProblem()
    if torch and importlib.util.find_spec("torch") is not None:
        raise RuntimeError(
            torch + ". Install a suitable version with the PyTorch Utils module (or pip) and restart Slicer; "
            "FewShotSAM2 does not replace an installed torch because other extensions may rely on it."
        )
    message = (
        "FewShotSAM2 cannot run yet:\n- " + "\n- ".join(problems) + "\n\n"
        f"Install now? torch{TORCH_VERSION_REQUIREMENT} (several GB with CUDA; through the PyTorch extension when "
        f"present), sam2 {SAM2_VERSION} (checked against its SHA256) and the packages listed above will be "
        "downloaded from PyPI. This can take minutes."
    )
    if confirm is None or not confirm(message):
        raise RuntimeError("FewShotSAM2 cannot run without its Python packages: " + "; ".join(problems) + ".")
    before = importedDistributionVersions()
    if torch or importlib.util.find_spec("torchvision") is None:
        installTorch()
    if sam2Problem():
        installSam2()
    requirements = [r for (module, _pip), r in zip(_PACKAGES, list(SAM2_RUNTIME_REQUIREMENTS) + list(OTHER_REQUIREMENTS))
                    if importlib.util.find_spec(module) is None]
    if method == "lpips" and importlib.util.find_spec("lpips") is None:
        requirements.append(LPIPS_REQUIREMENT)
    if requirements:
        _pipInstall(requirements)
    importlib.invalidate_caches()
    still = missingDependencies(method)
    if still:
        raise RuntimeError("Installation finished but FewShotSAM2 still cannot run: " + "; ".join(still) + ".")
    changed = sorted(name for name, version in before.items() if importedDistributionVersions().get(name) != version)
    if changed:
        logging.warning("FewShotSAM2: already imported packages were replaced (%s): restart Slicer", ", ".join(changed))
    return bool(changed)
