"""The Python packages the segmentation process needs inside Slicer: checked without importing them, installed
only after the user agreed, sam2 pinned by its hash.

sam2 on PyPI (`sam2==1.1.0`) is published by a third party, not by Meta. Its source archive's `sam2/` package is
byte-identical to Meta's github.com/facebookresearch/sam2 at commit 2b90b9f (15 Dec 2024), so that exact archive
is pinned by its SHA256: pip refuses anything else (`--require-hashes`). It is installed without its dependency
pins (`--no-deps`) and without building its optional CUDA extension (`SAM2_BUILD_CUDA=0`, restored afterwards);
its runtime dependencies are installed by name.

Nothing here imports torch, sam2 or lpips: the checks read package metadata and look for files, and torch is
installed by light-the-torch run in a PythonSlicer process of its own, so Slicer's own process stays free of torch
(the segmentation runs in its own process; on Windows a loaded torch would lock its DLLs against updates).

What a run needs follows its settings (`needs`): `lpips` and the torchvision ImageNet weights of its backbone
(AlexNet, 233 MB, downloaded once into torch's cache) for the LPIPS method and for the Automatic slice range.
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

# Slicer 5.8 ships Python 3.9.10; the core and sam2 1.1.0 need Python >= 3.10 (Slicer 5.10 ships 3.12.10)
PYTHON_MINIMUM = (3, 10)
SLICER_REQUIREMENT = "3D Slicer 5.10 or later"

# torchvision ImageNet weights of each LPIPS backbone: (file name in torch's hub cache, size in MB); the core loads
# them through torchvision (fewshotsam2.matching.lpips_distance), which downloads them there on first use
LPIPS_BACKBONE_WEIGHTS = {
    "alex": ("alexnet-owt-7be5be79.pth", 233),
    "vgg": ("vgg16-397923af.pth", 528),
    "squeeze": ("squeezenet1_1-b8a52dc0.pth", 5),
}
LPIPS_WEIGHTS_ENV = "FEWSHOTSAM2_LPIPS_WEIGHTS"  # fewshotsam2.matching.lpips_distance.LPIPS_WEIGHTS_ENV
LIGHT_THE_TORCH_REQUIREMENT = "light-the-torch>=0.5"

# import name -> pip name, checked for every method (lpips only when the run needs it: see `needs`)
_PACKAGES = (("hydra", "hydra-core"), ("iopath", "iopath"), ("PIL", "pillow"), ("tqdm", "tqdm"),
             ("scipy", "scipy"), ("SimpleITK", "SimpleITK"), ("slicerio", "slicerio"))


def _findSpec(module: str):
    """importlib.util.find_spec, with a module blocked in sys.modules (None) counted as missing."""
    try:
        return importlib.util.find_spec(module)
    except ValueError:
        return None


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


def pythonProblem(versionInfo=None) -> Optional[str]:
    """Why this Slicer's Python cannot run FewShotSAM2 (Slicer 5.8 has Python 3.9), or None."""
    version = tuple(versionInfo or sys.version_info)[:3]
    if version[:2] >= PYTHON_MINIMUM:
        return None
    return (f"FewShotSAM2 needs {SLICER_REQUIREMENT}: this Slicer runs Python {'.'.join(str(v) for v in version)}, "
            f"and FewShotSAM2 and SAM2 need Python {'.'.join(str(v) for v in PYTHON_MINIMUM)} or later. "
            "Install a current 3D Slicer from download.slicer.org.")


def sliceRangeIsAuto(sliceRange) -> bool:
    """Whether a --slice-range text ("auto", "off", "3:40", "1=auto,off", ...) estimates any range."""
    if sliceRange is None:
        return False
    return any(item.split("=", 1)[-1].strip().lower() == "auto" for item in str(sliceRange).split(","))


def needs(method: Optional[str] = "reverse", sliceRange="off", lpipsNet: str = "alex") -> dict:
    """What a run needs beyond the packages of every run: {"lpips": bool, "weights": [LPIPS backbone names]}.

    method None: the slice-range estimate (`fewshotsam2 extent`), which always compares slices with AlexNet LPIPS.
    The Automatic slice range (`sliceRange` "auto", the GUI's default) runs the same estimate before segmenting.
    """
    nets = []
    if method is None or sliceRangeIsAuto(sliceRange):
        nets.append("alex")
    if method == "lpips" and lpipsNet not in nets:
        nets.append(lpipsNet)
    return {"lpips": bool(nets), "weights": nets}


def torchHubCheckpoints() -> Path:
    """torch.hub's checkpoint folder as torch computes it ($TORCH_HOME/hub, default $XDG_CACHE_HOME/torch/hub)."""
    torchHome = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser(os.path.join("~", ".cache")), "torch")
    return Path(os.path.expanduser(torchHome)) / "hub" / "checkpoints"


def missingWeights(method: Optional[str] = "reverse", sliceRange="off", lpipsNet: str = "alex",
                   lpipsWeights: Optional[str] = None) -> list[str]:
    """The LPIPS backbones whose ImageNet weights the run needs and torch's cache lacks (a weights file given with
    `lpipsWeights` or $FEWSHOTSAM2_LPIPS_WEIGHTS serves the AlexNet estimate and the LPIPS method alike)."""
    if lpipsWeights or os.environ.get(LPIPS_WEIGHTS_ENV):
        return []
    folder = torchHubCheckpoints()
    return [net for net in needs(method, sliceRange, lpipsNet)["weights"]
            if not (folder / LPIPS_BACKBONE_WEIGHTS[net][0]).is_file()]


def weightsLine(nets: list[str]) -> str:
    """One readable line about the backbone weights a run will download."""
    files = ", ".join(f"{LPIPS_BACKBONE_WEIGHTS[n][0]} ({LPIPS_BACKBONE_WEIGHTS[n][1]} MB)" for n in nets)
    return (f"the ImageNet weights of the LPIPS backbone ({files}) are not downloaded yet; the Automatic slice range "
            f"and the LPIPS method need them (once, into {torchHubCheckpoints()})")


def missingDependencies(method: Optional[str] = "reverse", sliceRange="off", lpipsNet: str = "alex") -> list[str]:
    """What must be installed or fixed before a run, as readable lines (empty: ready). Nothing is imported.

    method None: the slice-range estimate. sliceRange: the run's --slice-range ("auto" needs lpips too).
    """
    problems = []
    python = pythonProblem()
    if python:
        return [python]
    torch = torchProblem()
    if torch:
        problems.append(torch)
    elif importlib.util.find_spec("torchvision") is None:
        problems.append("torchvision is not installed")
    sam2 = sam2Problem()
    if sam2:
        problems.append(sam2)
    wanted = list(_PACKAGES) + ([("lpips", LPIPS_REQUIREMENT)] if needs(method, sliceRange, lpipsNet)["lpips"] else [])
    for module, pipName in wanted:
        if _findSpec(module) is None:
            problems.append(f"{pipName} is not installed")
    return problems


def missingForJobFiles() -> list[str]:
    """What Slicer's own process needs to write a run's inputs (the images as NRRD, the labels as .seg.nrrd)."""
    return [f"{pipName} is not installed" for module, pipName in (("SimpleITK", "SimpleITK"), ("slicerio", "slicerio"))
            if _findSpec(module) is None]


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
    """torch and torchvision, installed by light-the-torch (which picks the CUDA build that fits the driver, as the
    PyTorch extension's PyTorchUtils does) run as `PythonSlicer -m light_the_torch install ...`, a process of its own.

    PyTorchUtils.installTorch is not used: it imports light_the_torch and then torch into Slicer's process (on
    Windows the loaded DLLs then stay locked until Slicer quits). An installed torch of a usable version is kept:
    only torchvision is added, pinned to it without the local tag (`torch==2.5.1`, never `==2.5.1+cu121`, which no
    index serves under that name). Plain pip when light-the-torch cannot be run.
    """
    import slicer

    installed = _version("torch") if torchProblem() is None else None
    torchRequirement = f"=={installed.split('+', 1)[0]}" if installed else TORCH_VERSION_REQUIREMENT
    # PythonSlicer -m MODULE ARGS: executePythonModule from 5.12 (_executePythonModule is deprecated there), the
    # private one in 5.10
    runModule = getattr(slicer.util, "executePythonModule", None) or getattr(slicer.util, "_executePythonModule", None)
    if runModule is not None:
        try:
            if _findSpec("light_the_torch") is None:
                _pipInstall([LIGHT_THE_TORCH_REQUIREMENT])
                importlib.invalidate_caches()
            runModule("light_the_torch", ["install", f"torch{torchRequirement}", "torchvision"])
            return
        except Exception as exc:  # noqa: BLE001  (no light-the-torch: pip's own choice of build below)
            logging.warning("FewShotSAM2: light-the-torch could not install torch (%s); trying pip", exc)
    logging.info("FewShotSAM2: installing torch with pip (CPU/CUDA build as pip picks)")
    _pipInstall([f"torch{torchRequirement}", "torchvision"])


def downloadLpipsWeights(nets: list[str], python: Optional[str] = None) -> None:
    """Download the torchvision ImageNet weights of LPIPS backbones into torch's cache, in a process of its own (torch
    is never imported into Slicer); the same call the core makes on first use (fewshotsam2.matching.lpips_distance)."""
    from . import process

    process.runCore(
        "from fewshotsam2.matching.lpips_distance import _torchvision_state_dict\n"
        "for net in sys.argv[1:]:\n"
        "    _torchvision_state_dict(net)\n",
        *nets, python=python,
    )


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


def installDependencies(method: Optional[str] = "reverse", confirm: Optional[Callable[[str], bool]] = None,
                        sliceRange="off", lpipsNet: str = "alex", lpipsWeights: Optional[str] = None,
                        python: Optional[str] = None) -> bool:
    """Install what `missingDependencies` lists and download what `missingWeights` lists, after
    `confirm(message) -> bool` agrees. Never silent.

    A torch of the wrong version is not replaced (other extensions may depend on it): the user is told what to do.
    Returns True if Slicer should be restarted (a package already imported got another version on disk).
    """
    python_ = pythonProblem()
    if python_:
        raise RuntimeError(python_)
    problems = missingDependencies(method, sliceRange, lpipsNet)
    weights = missingWeights(method, sliceRange, lpipsNet, lpipsWeights)
    if not problems and not weights:
        return False
    torch = torchProblem()
    if torch and _findSpec("torch") is not None:
        raise RuntimeError(
            torch + ". Install a suitable version with the PyTorch Utils module (or pip) and restart Slicer; "
            "FewShotSAM2 does not replace an installed torch because other extensions may rely on it."
        )
    lines = problems + ([weightsLine(weights)] if weights else [])
    message = "FewShotSAM2 cannot run yet:\n- " + "\n- ".join(lines) + "\n\n"
    if problems:
        message += (f"Install now? torch{TORCH_VERSION_REQUIREMENT} (several GB with CUDA, through light-the-torch), "
                    f"sam2 {SAM2_VERSION} (checked against its SHA256) and the packages listed above will be "
                    "downloaded from PyPI")
        message += ", and the weights from download.pytorch.org." if weights else "."
        message += " This can take minutes; Slicer is busy meanwhile."
    else:
        message += "Download them now from download.pytorch.org? (Or choose Slice range: Off to segment every slice.)"
    if confirm is None or not confirm(message):
        raise RuntimeError("FewShotSAM2 cannot run without: " + "; ".join(lines) + ".")
    changed = []
    if problems:
        before = importedDistributionVersions()
        if torch or _findSpec("torchvision") is None:
            installTorch()
        if sam2Problem():
            installSam2()
        requirements = [r for (module, _pip), r in zip(_PACKAGES, list(SAM2_RUNTIME_REQUIREMENTS) + list(OTHER_REQUIREMENTS))
                        if _findSpec(module) is None]
        if needs(method, sliceRange, lpipsNet)["lpips"] and _findSpec("lpips") is None:
            requirements.append(LPIPS_REQUIREMENT)
        if requirements:
            _pipInstall(requirements)
        importlib.invalidate_caches()
        still = missingDependencies(method, sliceRange, lpipsNet)
        if still:
            raise RuntimeError("Installation finished but FewShotSAM2 still cannot run: " + "; ".join(still) + ".")
        changed = sorted(name for name, version in before.items() if importedDistributionVersions().get(name) != version)
        if changed:
            logging.warning("FewShotSAM2: already imported packages were replaced (%s): restart Slicer", ", ".join(changed))
    weights = missingWeights(method, sliceRange, lpipsNet, lpipsWeights)
    if weights:
        downloadLpipsWeights(weights, python=python)
    return bool(changed)
