"""`fewshotsam2 batch --ray local --workers 2`: the same outputs as the local batch, voxel for voxel, and a worker
killed mid-case is restarted by Ray and its case redone. One local Ray cluster (2 CPUs) serves the module."""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import threading
import time
import warnings

import numpy as np
import pytest
import SimpleITK as sitk

from fewshotsam2 import cli
from fewshotsam2.commands.batch import SUMMARY_NAME, read_summary, record_path
from test_batch import MODEL, OUTPUTS, cohort, local_run  # noqa: F401  (module fixtures shared with the local tests)

ray = pytest.importorskip("ray", reason="Ray is the optional extra [ray]; scripts/setup_env.sh installs it")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster for the module (starting one takes seconds); the batch uses it instead of its own."""
    from fewshotsam2.commands import batch_ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, object_store_memory=batch_ray.LOCAL_OBJECT_STORE,
             runtime_env=batch_ray.runtime_env())
    yield
    ray.shutdown()


def _batch(argv, quiet: bool = True) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        warnings.simplefilter("ignore")
        rc = cli.main(["batch", *argv, *(m for m in MODEL if quiet or m != "--quiet")])
    return rc, out.getvalue(), err.getvalue()


def _labels(folder) -> list[np.ndarray]:
    return [sitk.GetArrayFromImage(sitk.ReadImage(str(folder / o))) for o in OUTPUTS]


def test_ray_workers_give_the_local_outputs(cohort, local_run, ray_cluster, tmp_path):  # noqa: F811
    rc, stdout, err = _batch(["--manifest", str(cohort["manifest"]), "--out-dir", str(tmp_path), "--ray", "local",
                              "--workers", "2"], quiet=False)
    assert rc == 0, err
    assert "3 cases: 3 ok, 0 skipped, 0 failed" in stdout
    # the bar shows the running cases' stages, as the workers report them (the latest one of each case)
    assert "batch on 2 Ray workers" in err and re.search(r"case/s, (mr|ct-b|spleen): ", err), err
    for mine, local in zip(_labels(tmp_path), local_run[3]):
        np.testing.assert_array_equal(mine, local)
    summary = read_summary(str(tmp_path / SUMMARY_NAME))
    assert [r["status"] for r in summary] == ["ok"] * 3
    # each worker encodes the supports for its own first case only
    assert all(int(r["encoder_calls"]) > 0 for r in summary)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [o.split("/")[1] for o in OUTPUTS] + [record_path(o).name for o in OUTPUTS])  # outputs, completion records


def _worker_running_a_case() -> int | None:
    """The pid of a Ray worker process whose title says it is running CaseWorker.run (Ray sets it per task)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::CaseWorker.run"):
            return int(pid)
    return None


def test_a_worker_killed_mid_case_is_restarted_and_the_case_redone(cohort, local_run, ray_cluster,  # noqa: F811
                                                                   tmp_path):
    result = {}
    run = threading.Thread(target=lambda: result.update(zip(("rc", "out", "err"), _batch(
        ["--manifest", str(cohort["manifest"]), "--out-dir", str(tmp_path), "--ray", "local", "--workers", "2"]))))
    run.start()
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and run.is_alive() and time.monotonic() < deadline:
        killed = _worker_running_a_case()
        if killed is None:
            time.sleep(0.005)
    assert killed is not None, "no worker was seen running a case"
    os.kill(killed, signal.SIGKILL)
    run.join(timeout=600)
    assert not run.is_alive()
    assert result["rc"] == 0, result["err"]
    assert "3 cases: 3 ok, 0 skipped, 0 failed" in result["out"]
    for mine, local in zip(_labels(tmp_path), local_run[3]):
        np.testing.assert_array_equal(mine, local)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [o.split("/")[1] for o in OUTPUTS] + [record_path(o).name for o in OUTPUTS])  # outputs, completion records
