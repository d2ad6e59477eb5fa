"""The server's overhead: the same `segment` run here and through `fewshotsam2 serve` on 127.0.0.1.

`python -m fewshotsam2.serve.bench --data ../shared/data [--sizes 64,512] [--clinical-slices 300]
[--slice-range off|auto]` starts a server (1 replica, loopback, a token of its own, no feature cache: every run
encodes its slices, here and there), runs one warm-up job, then for each case and image size runs
`segment --progress json` locally and with `--server` (each in a fresh process, as Slicer runs them) and prints one
Markdown row per run: wall time of the command, the segmentation's own seconds (the done event), and for the remote
run the upload, the wait until a replica took the job, and the download. Overhead = wall - segmentation seconds.
The local wall includes building the model (seconds); the server keeps its model loaded between jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

from fewshotsam2.io.volume import write_labels
from fewshotsam2.research.clinical_ct import build

PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def _command(*argv: str) -> list[str]:
    return [sys.executable, "-m", "fewshotsam2.cli", *argv]


THREADS = {"n": 1}


def _env() -> dict:
    n = str(THREADS["n"])
    return {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT), "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": n,
            "MKL_NUM_THREADS": n}


def _run(argv: list[str]) -> tuple[float, dict]:
    t0 = time.monotonic()
    # a session of its own, as Slicer starts its run (and as the server runs): with the kernel's autogroup
    # scheduling, CPU time is shared per session, so a run in this script's session would compete with it
    run = subprocess.run(_command("segment", *argv, "--progress", "json"), capture_output=True, text=True, env=_env(),
                         timeout=3600, start_new_session=True)
    wall = time.monotonic() - t0
    if run.returncode != 0:
        raise SystemExit(f"failed ({run.returncode}): {' '.join(argv)}\n{run.stderr[-2000:]}")
    done = [json.loads(line) for line in run.stdout.splitlines() if '"done"' in line][-1]
    return wall, done


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="the shared data folder (abdomen-ct/ct-a, ct-b)")
    p.add_argument("--sizes", default="64", help="image sizes, comma-separated (default 64)")
    p.add_argument("--clinical-slices", type=int, default=300, help="slices of the clinical-size CT (0: skip it)")
    p.add_argument("--clinical-sizes", help="image sizes for the clinical-size CT (default: --sizes)")
    p.add_argument("--method", default="propagate")
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-ct-b", action="store_true", help="only the clinical-size CT")
    p.add_argument("--threads", type=int, default=1, help="torch threads, the same here and on the replica (Ray "
                   "gives a replica OMP_NUM_THREADS = its CPUs, 1, unless told: unequal threads made the local "
                   "runs look slower on a loaded machine)")
    p.add_argument("--slice-range", default="off", help="off (every slice) or auto (needs the LPIPS weights: "
                   "$FEWSHOTSAM2_LPIPS_WEIGHTS reaches the server and the local runs)")
    args = p.parse_args(argv)
    THREADS["n"] = args.threads
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))  # stop the server too
    data = Path(args.data)
    work = Path(tempfile.mkdtemp(prefix="fewshotsam2-bench-serve-"))
    ct = data / "abdomen-ct"
    cases = [("ct-b (20 slices, DICOM)", ["--query", str(ct / "ct-b" / "dicom"), "--support",
                                          str(ct / "ct-a" / "image.nii.gz"), str(ct / "ct-a" / "labels.nii.gz"),
                                          "--labels", "5"])]
    if args.clinical_slices:
        image, labels = build(data, args.clinical_slices)
        sitk.WriteImage(image.to_sitk(), str(work / "image.nii.gz"))
        write_labels(work / "labels.nii.gz", labels, [])
        cases.append((f"clinical CT ({args.clinical_slices} slices)",
                      ["--query", str(work / "image.nii.gz"), "--support", str(work / "image.nii.gz"),
                       str(work / "labels.nii.gz"), "--labels", "7"]))
    token = work / "token.txt"
    token.write_text(secrets.token_urlsafe(24))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(_command("serve", "--port", str(port), "--token-file", str(token), "--replicas", "1",
                                       "--max-upload-mb", "4096", "--feature-cache", "off",
                                       "--threads", str(args.threads), "--cpus-per-replica", "1"),
                              stdout=subprocess.PIPE, stderr=open(work / "server.err", "w"), text=True, env=_env(),
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and "ready" not in server.stdout.readline():
            pass
        url = f"http://127.0.0.1:{port}"
        remote = ["--server", url, "--token-file", str(token)]
        common = ["--method", args.method, "--untrained", "--device", args.device, "--feature-cache", "off"]
        _run([*cases[0][1], *common, "--slice-range", "off", "--image-size", "64", "--out", str(work / "warm.nii.gz"),
              *remote])  # warm-up
        common += ["--slice-range", args.slice_range]
        print(f"load average {os.getloadavg()[0]:.1f} (1 min) at the start; --slice-range {args.slice_range}; "
              f"{args.threads} torch thread(s) here and on the replica")
        print("| case | image size | where | wall (s) | segmentation (s) | overhead (s) | upload (MB, s) | "
              "until a replica took it (s) | download (s) | encoder calls | load (1 min) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for name, inputs in cases[1:] if args.skip_ct_b else cases:
            sizes = args.clinical_sizes if args.clinical_sizes and "clinical" in name else args.sizes
            for size in [int(x) for x in sizes.split(",")]:
                model = [*common, "--image-size", str(size)]
                for where, extra in (("local", []), ("server", remote)):
                    out = work / f"{where}.nii.gz"
                    wall, done = _run([*inputs, *model, "--out", str(out), *extra])
                    out.unlink()
                    t = done.get("transfer")
                    cells = (f"{t['upload_mb']:.1f}, {t['upload_s']:.2f} | {t['until_started_s']:.2f} | "
                             f"{t['download_s']:.2f}") if t else "| |"
                    print(f"| {name} | {size} | {where} | {wall:.1f} | {done['seconds']:.1f} | "
                          f"{wall - done['seconds']:.1f} | {cells} | {done.get('encoder_calls')} | "
                          f"{os.getloadavg()[0]:.1f} |", flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=90)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
