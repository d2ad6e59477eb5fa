"""`fewshotsam2 serve` on Ray Serve, on 127.0.0.1 only: one server (a subprocess, TLS with a self-signed
certificate, 8 client tokens, 1 CPU replica) serves the whole module and is stopped at its end, Ray with it.

Every loop here stops by itself (deadlines); the load test is 8 clients x 3 jobs."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO, cli_command, cli_env, run_cli
from fewshotsam2 import cli
from fewshotsam2.serve.client import Client, ServerError
from fewshotsam2.serve.protocol import pack_job
from serve_helpers import raw_archive, write_case

pytest.importorskip("ray.serve", reason="`serve` needs the extra [serve]; scripts/setup_env.sh installs it")
pytestmark = pytest.mark.slow

CLIENTS = [f"client{n}" for n in range(8)]
MAX_UPLOAD_MB = 20
MODEL = ["--untrained", "--image-size", "64", "--device", "cpu"]
START_S, STOP_S = 300, 90
LPIPS_WEIGHTS = REPO.parent / "shared" / "weights" / "lpips" / "alexnet_features.pth"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Server:
    def __init__(self, proc, url, tokens, jobs_dir, lines):
        self.proc, self.url, self.tokens, self.jobs_dir, self.lines = proc, url, tokens, jobs_dir, lines

    def client(self, name: str = "client0") -> Client:
        return Client(self.url, self.tokens[name], timeout=30)

    def replica(self, deployment: str) -> int | None:
        for pid in _descendants(self.proc.pid):
            if _cmdline(pid).startswith(f"ray::ServeReplica:fewshotsam2:{deployment}"):
                return pid
        return None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("server")
    tokens = {name: f"{name}-" + os.urandom(16).hex() for name in CLIENTS}
    (d / "tokens.txt").write_text("".join(f"{n}:{t}\n" for n, t in tokens.items()))
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    jobs_dir = d / "jobs"
    port = _free_port()
    # the server's own LPIPS weights (the slice-range estimate, reverse, lpips)
    lpips = {"FEWSHOTSAM2_LPIPS_WEIGHTS": str(LPIPS_WEIGHTS)} if LPIPS_WEIGHTS.is_file() else {}
    proc = subprocess.Popen(
        cli_command("serve", "--host", "127.0.0.1", "--port", port, "--token-file", d / "tokens.txt", "--tls-cert",
                    cert, "--tls-key", key, "--replicas", "1", "--threads", "1", "--max-queue", "6",
                    "--max-jobs-per-client", "3", "--max-upload-mb", MAX_UPLOAD_MB, "--jobs-dir", jobs_dir),
        stdout=subprocess.PIPE, stderr=open(d / "server.err", "w"), text=True, env=cli_env(RAY_USAGE_STATS_ENABLED="0", **lpips),
        start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + START_S
    while not any("ready" in line for line in lines) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    previous_ca = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = str(cert)  # the clients (urllib) trust the test certificate, nothing else changes
    spawned: set[int] = set()
    try:
        assert any("ready" in line for line in lines), (lines, (d / "server.err").read_text()[-3000:])
        assert lines[0].startswith(f"fewshotsam2 serve: https://127.0.0.1:{port}"), lines
        server = Server(proc, f"https://127.0.0.1:{port}", tokens, jobs_dir, lines)
        spawned = _descendants(proc.pid)
        yield server
    finally:
        if previous_ca is None:
            os.environ.pop("SSL_CERT_FILE", None)
        else:
            os.environ["SSL_CERT_FILE"] = previous_ca
        spawned |= _descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in spawned) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [(p, _cmdline(p)[:80]) for p in spawned if _alive(p)]
        for p, _ in left:  # never leave Ray behind, even when the test fails
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    # after the module: the server stopped by itself on SIGTERM, with every Ray process it started, and its jobs
    assert proc.returncode == 0, (d / "server.err").read_text()[-3000:]
    assert not left, f"Ray processes left running after the server stopped: {left}"


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    d = tmp_path_factory.mktemp("cases")
    return {"small": write_case(d, 4, 2, 1, "small"), "support": write_case(d, 5, 0, 2, "support"),
            "long": write_case(d, 60, 2, 3, "long"), "dir": d}


OPTIONS = {"untrained": True, "image_size": 64, "device": "cpu"}


def _archive(query: str, support: tuple[str, str], options: dict) -> bytes:
    buf = io.BytesIO()
    pack_job(buf, [query, *support], {"query": 0, "supports": [[1, 2]], "labels": "3", "out_suffix": ".nii.gz",
                                      "scores": False, "options": options})
    return buf.getvalue()


def _submit(client: Client, data: bytes) -> str:
    return client.submit(io.BytesIO(data), len(data))["id"]


def _wait(client: Client, job: str, until, timeout: float = 180.0, every: float = 0.1) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.status(job)
        if until(status):
            return status
        time.sleep(every)
    raise AssertionError(f"job {job} did not get there in {timeout} s: {status['state']}")


def _jobs_in(folder: Path) -> list[str]:
    """The job folders in the server's jobs folder (not its feature cache, .features, which outlives jobs)."""
    return sorted(p.name for p in folder.iterdir() if p.name != ".features") if folder.exists() else []


def _raw(server, method: str, path: str, headers: dict, body: bytes | None = None) -> tuple[int, dict]:
    host, port = server.url.split("//")[1].split(":")
    conn = http.client.HTTPSConnection(host, int(port), timeout=30,
                                       context=ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"]))
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        text = response.read()
        return response.status, (json.loads(text) if text.startswith(b"{") else {})
    finally:
        conn.close()


def test_health_version_and_tokens(server, cases):
    assert _raw(server, "GET", "/healthz", {})[0] == 200
    version = server.client().version()
    assert version["api"] == 1 and version["replicas"] == 1 and version["device"].startswith("cpu")
    data = _archive(cases["small"][0], cases["support"], OPTIONS)
    for headers in ({}, {"Authorization": "Bearer " + server.tokens["client0"][:-1] + "x"},
                    {"Authorization": "Basic " + server.tokens["client0"]}):
        assert _raw(server, "GET", "/version", headers)[0] == 401
        status, body = _raw(server, "POST", "/jobs", {**headers, "Content-Length": str(len(data))}, data)
        assert status == 401 and "token" in body["error"]
    assert _jobs_in(server.jobs_dir) == []  # nothing stored, nothing run
    assert server.client().version()["jobs"] == 0
    with pytest.raises(ServerError, match="refused the token"):
        Client(server.url, "x" * 40).version()
    with pytest.raises(ServerError, match="TLS certificate is not trusted"):  # https for real: an unknown CA fails
        os.environ["SSL_CERT_FILE"], ca = "/nonexistent.pem", os.environ["SSL_CERT_FILE"]
        try:
            server.client().version()
        finally:
            os.environ["SSL_CERT_FILE"] = ca


def _local(argv: list[str]) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cli.main(["segment", *argv, "--quiet"])


def test_same_job_through_the_server_gives_the_local_voxels(server, shared_dir, tmp_path):
    ct = shared_dir / "data" / "abdomen-ct"
    job = ["--query", str(ct / "ct-b" / "dicom"), "--support", str(ct / "ct-a" / "image.nii.gz"),
           str(ct / "ct-a" / "labels.nii.gz"), "--labels", "liver=5", "--slice-range", "off", "--top-k", "3", *MODEL]
    # with a feature cache, as the server's replicas run (lossless: the same voxels as without one)
    assert _local([*job, "--out", str(tmp_path / "local.seg.nrrd"), "--scores", str(tmp_path / "local.csv"),
                   "--feature-cache", str(tmp_path.parent / f"{tmp_path.name}-features")]) == 0
    token = tmp_path / "token.txt"
    token.write_text(server.tokens["client1"] + "\n")
    run = run_cli("segment", *job, "--server", server.url, "--token-file", token, "--out", tmp_path / "remote.seg.nrrd",
                  "--scores", tmp_path / "remote.csv", "--progress", "json", timeout=600)
    assert run.returncode == 0, run.stderr
    events = [json.loads(line) for line in run.stdout.splitlines()]
    # the local --progress json stream and the job's id (to re-attach), nothing else (the warning: --untrained's
    # RANDOM WEIGHTS)
    assert {e["event"] for e in events} == {"submitted", "progress", "warning", "done"}
    assert all("RANDOM WEIGHTS" in e["message"] for e in events if e["event"] == "warning")
    assert events[-1]["out"] == str(tmp_path / "remote.seg.nrrd") and events[-1]["voxels"]["liver"] > 0
    local = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "local.seg.nrrd")))
    remote = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "remote.seg.nrrd")))
    np.testing.assert_array_equal(remote, local)
    assert (tmp_path / "remote.csv").read_text() == (tmp_path / "local.csv").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["local.seg.nrrd", "local.csv", "remote.seg.nrrd", "remote.csv", "token.txt"])  # no temporary file left
    assert _jobs_in(server.jobs_dir) == []  # fetched, then deleted on the server


def test_bad_input_through_the_server_is_the_local_error(server, cases, tmp_path):
    token = tmp_path / "token.txt"
    token.write_text(server.tokens["client1"])
    image, labels = cases["support"]
    import contextlib

    job = ["--query", cases["small"][0], "--support", image, labels, "--labels", "9", "--out",
           str(tmp_path / "x.nii.gz"), *MODEL]
    lines = {}
    for where, extra in (("here", []), ("server", ["--server", server.url, "--token-file", str(token)])):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert _local([*job, *extra]) == 2
        lines[where] = [line for line in err.getvalue().splitlines() if line.startswith("fewshotsam2:")]
    # one line, the local one: the server puts the client's own file names back into its messages
    assert lines["server"] == lines["here"] and len(lines["here"]) == 1 and "label '9' is absent" in lines["here"][0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token.txt"]


def test_another_clients_job_is_not_found(server, cases):
    alice, bob = server.client("client2"), server.client("client3")
    job = _submit(alice, _archive(cases["small"][0], cases["support"], OPTIONS))
    for call in (lambda: bob.status(job), lambda: bob.cancel(job), lambda: bob.fetch(job, "out"),
                 lambda: bob.delete(job)):
        with pytest.raises(ServerError) as exc:
            call()
        assert exc.value.status == 404
    done = _wait(alice, job, lambda s: s["state"] in ("done", "failed"))
    assert done["state"] == "done", done
    with pytest.raises(ServerError) as exc:
        bob.fetch(job, "out")
    assert exc.value.status == 404
    assert alice.fetch(job, "out")[:2] == b"\x1f\x8b"  # gzip: the .nii.gz the job wrote
    alice.delete(job)
    with pytest.raises(ServerError):
        alice.status(job)


def test_oversized_upload_is_refused_before_it_is_stored(server):
    before = _jobs_in(server.jobs_dir)
    host, port = server.url.split("//")[1].split(":")
    conn = http.client.HTTPSConnection(host, int(port), timeout=30,
                                       context=ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"]))
    conn.putrequest("POST", "/jobs")
    conn.putheader("Authorization", "Bearer " + server.tokens["client0"])
    conn.putheader("Content-Length", str(MAX_UPLOAD_MB * 2**20 + 1))
    conn.endheaders()  # the body is never sent: the answer must come without it
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    assert response.status == 413 and "over this server's limit" in body["error"]
    assert _jobs_in(server.jobs_dir) == before


def test_path_like_names_cannot_escape_the_job_folder(server, cases):
    image = Path(cases["small"][0]).read_bytes()
    support = [Path(p).read_bytes() for p in cases["support"]]
    manifest = {"api": 1, "query": 0, "supports": [[1, 2]], "labels": "3", "out_suffix": ".nii.gz",
                "options": OPTIONS, "inputs": [{"kind": "file", "suffix": ".nii.gz"}] * 3}
    members = {"i0": image, "i1": support[0], "i2": support[1]}
    target = server.jobs_dir.parent / "escaped.nii.gz"
    for hostile in ({**members, "../escaped.nii.gz": image},  # an extra member with a path
                    {"../escaped.nii.gz": image, "i1": support[0], "i2": support[1]}):
        data = raw_archive(hostile, manifest)
        status, body = _raw(server, "POST", "/jobs", {"Authorization": "Bearer " + server.tokens["client4"],
                                                      "Content-Length": str(len(data))}, data)
        assert status == 400, body
        assert not target.exists() and _jobs_in(server.jobs_dir) == []
    for bad in ({**manifest, "inputs": [{"kind": "file", "suffix": "/../../escaped.nii.gz"}] * 3},
                {**manifest, "out_suffix": "/../../escaped.nii.gz"},
                {**manifest, "options": {**OPTIONS, "out": str(target)}},
                {**manifest, "options": {**OPTIONS, "checkpoint": str(target)}}):
        data = raw_archive(members, bad)
        status, body = _raw(server, "POST", "/jobs", {"Authorization": "Bearer " + server.tokens["client4"],
                                                      "Content-Length": str(len(data))}, data)
        assert status == 400, body
        assert not target.exists() and _jobs_in(server.jobs_dir) == []


def test_cancel_stops_the_job_within_a_second(server, cases):
    client = server.client("client5")
    job = _submit(client, _archive(cases["long"][0], cases["support"], {**OPTIONS, "slice_range": "off"}))
    _wait(client, job, lambda s: s["state"] == "running" and any(
        e["event"] == "progress" and "Label" in e["stage"] for e in s["events"]), every=0.02)
    t0 = time.monotonic()
    client.cancel(job)
    status = _wait(client, job, lambda s: s["state"] != "running", timeout=30, every=0.02)
    took = time.monotonic() - t0
    assert status["state"] == "cancelled" and status["exit_code"] == 130, status
    print(f"cancel took {took:.2f} s")
    assert took < 1.0, f"cancel took {took:.2f} s"
    assert not any(e["event"] == "done" for e in status["events"])
    with pytest.raises(ServerError):
        client.fetch(job, "out")
    client.delete(job)


def _slicer_run(tmp_path, name, case, server, options=None):
    """Slicer's segmentation process (FewShotSAM2Lib.process), on job files written as the Logic writes them."""
    from types import SimpleNamespace

    from FewShotSAM2Lib import process
    from fewshotsam2.io.volume import Structure, read_labels, read_volume

    image = read_volume(case["support"][0])
    labels, _ = read_labels(case["support"][1], image)
    (tmp_path / name).mkdir()
    job = process.SegmentationProcess(folder=tmp_path / name)
    job.server = server
    arguments = process.writeJobInputs(job.folder, read_volume(case["query"]), [SimpleNamespace(image=image,
                                       labels=labels)], [Structure(3, "disc", (1.0, 0.0, 0.0))])
    arguments += ["--method", "propagate"] + process.optionArguments(
        options or {"untrained": True, "image_size": 64, "device": "cpu", "slice_range": "off"})
    return job.start(arguments, scores=False)


def _until_finished(job, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while not job.finished and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.1)
    job.poll()
    assert job.finished, "the segmentation process did not finish"


def test_slicers_process_on_the_server_gives_the_local_result(server, cases, tmp_path, monkeypatch):
    pytest.importorskip("slicer", reason="the Slicer-side helpers need slicer-core")
    from FewShotSAM2Lib import remote
    from fewshotsam2.io.volume import Structure

    case = {"query": cases["small"][0], "support": cases["support"]}
    # the local process with a feature cache, as the server's replicas run
    monkeypatch.setenv("FEWSHOTSAM2_FEATURE_CACHE", str(tmp_path.parent / f"{tmp_path.name}-features"))
    here = _slicer_run(tmp_path, "here", case, None)
    there = _slicer_run(tmp_path, "there", case, remote.Server(server.url, server.tokens["client7"]))
    for job in (here, there):
        _until_finished(job)
    assert "--server" in there.command and server.tokens["client7"] not in " ".join(there.command)
    assert there.progress[0].startswith("disc: ") and there.done["device"] == "cpu"
    structures = [Structure(3, "disc", (1.0, 0.0, 0.0))]
    np.testing.assert_array_equal(there.readResult(structures).labels.array, here.readResult(structures).labels.array)
    # a wrong token: one clear line, as Slicer shows it
    wrong = _slicer_run(tmp_path, "wrong", case, remote.Server(server.url, "w" * 30))
    _until_finished(wrong, timeout=120)
    with pytest.raises(Exception, match="refused the token"):
        wrong.readResult(structures)


def test_slicers_cancel_cancels_the_job_on_the_server(server, cases, tmp_path):
    pytest.importorskip("slicer", reason="the Slicer-side helpers need slicer-core")
    from FewShotSAM2Lib import remote

    client = server.client("client7")
    job = _slicer_run(tmp_path, "long", {"query": cases["long"][0], "support": cases["support"]},
                      remote.Server(server.url, server.tokens["client7"]))
    deadline = time.monotonic() + 300
    while not job.progress[0].startswith("disc: ") and not job.finished and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.05)
    assert client.version()["running"] == 1
    t0 = time.monotonic()
    job.cancel()  # SIGTERM: the client deletes the job on its way out
    assert job.finished and time.monotonic() - t0 < 5
    deadline = time.monotonic() + 10
    while client.version()["jobs"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.version()["jobs"] == 0 and _jobs_in(server.jobs_dir) == []
    job.cleanup()


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_eight_clients_three_jobs_each_none_lost(server, cases):
    data = _archive(cases["small"][0], cases["support"], {**OPTIONS, "method": "propagate", "slice_range": "off"})
    gateway = server.replica("Gateway")
    rss_before = _rss_kib(gateway)
    results: dict[str, list] = {name: [] for name in CLIENTS}
    start = threading.Barrier(len(CLIENTS), timeout=60)

    def client_run(name: str) -> None:
        client = server.client(name)
        start.wait()
        ids = []
        for _ in range(3):
            try:
                ids.append(_submit(client, data))
            except ServerError as exc:
                results[name].append(("busy", exc.status, str(exc)))
        for job in ids:
            status = _wait(client, job, lambda s: s["state"] in ("done", "failed", "cancelled"), timeout=400,
                           every=0.5)
            results[name].append((status["state"], job, [e["event"] for e in status["events"]]))
            client.delete(job)

    threads = [threading.Thread(target=client_run, args=(n,), daemon=True) for n in CLIENTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=480)
    assert not any(t.is_alive() for t in threads), "a client never finished"
    outcomes = [r for rs in results.values() for r in rs]
    assert len(outcomes) == 24
    busy = [r for r in outcomes if r[0] == "busy"]
    done = [r for r in outcomes if r[0] == "done"]
    assert all(r[1] == 503 and "server busy" in r[2] for r in busy), busy
    assert len(busy) + len(done) == 24, outcomes  # every job finished or was refused; none failed or vanished
    assert len({r[1] for r in done}) == len(done)  # no duplicate ids
    assert all(events.count("done") == 1 and events.count("started") == 1 for _s, _j, events in done)
    assert 6 <= len(done), outcomes  # the queue (6) plus the running job were served
    assert _jobs_in(server.jobs_dir) == []
    assert server.client().version()["jobs"] == 0
    growth_mib = (_rss_kib(gateway) - rss_before) / 1024
    print(f"8 clients x 3 jobs: {len(done)} done, {len(busy)} refused busy; gateway grew {growth_mib:.1f} MiB")
    assert growth_mib < 100, f"the gateway grew by {growth_mib:.0f} MiB"


def test_a_killed_replica_is_replaced_and_its_job_redone(server, cases):
    client = server.client("client6")
    job = _submit(client, _archive(cases["long"][0], cases["support"], {**OPTIONS, "slice_range": "off"}))
    _wait(client, job, lambda s: s["state"] == "running" and any(e["event"] == "progress" for e in s["events"]),
          every=0.02)
    worker = server.replica("Worker")
    assert worker is not None
    os.kill(worker, signal.SIGKILL)
    assert _raw(server, "GET", "/healthz", {})[0] == 200  # the server keeps answering
    status = _wait(client, job, lambda s: s["state"] in ("done", "failed"), timeout=400, every=0.5)
    messages = [e.get("message", "") for e in status["events"] if e["event"] == "warning"]
    print(f"killed replica: job {status['state']} after {status['attempts']} attempts; {messages or status['message']}")
    if status["state"] == "done":  # redone on the replica Ray Serve started in place of the killed one
        assert status["attempts"] == 2 and any("stopped" in m and "runs again" in m for m in messages), status
    else:
        assert "the replica running this job stopped" in status["message"], status
    client.delete(job)
    # and the next job runs on the new replica
    again = _submit(client, _archive(cases["small"][0], cases["support"], OPTIONS))
    assert _wait(client, again, lambda s: s["state"] in ("done", "failed"), timeout=400)["state"] == "done"
    client.delete(again)
    assert server.replica("Worker") not in (None, worker)


def _done_event(status: dict) -> dict:
    return next(e for e in status["events"] if e["event"] == "done")


def test_a_second_job_with_the_same_support_encodes_no_support_slice(server, tmp_path):
    """The replicas keep what they encode (the feature cache in the jobs folder): a second job with the same support
    reads its support slices instead of encoding them; the counts are those of a local run with its own cache."""
    support = write_case(tmp_path, 5, 0, 21, "support")  # never seen by this server
    first_query, second_query = write_case(tmp_path, 4, 2, 22, "first"), write_case(tmp_path, 6, 1, 23, "second")
    client = server.client("client4")
    options = {**OPTIONS, "method": "propagate", "slice_range": "off"}
    done, outputs = [], []
    for query in (first_query, second_query):
        job = _submit(client, _archive(query[0], support, options))
        status = _wait(client, job, lambda s: s["state"] in ("done", "failed"), timeout=300)
        assert status["state"] == "done", status
        done.append(_done_event(status))
        outputs.append(client.fetch(job, "out"))
        client.delete(job)
    first, second = done
    support_slices = first["encoder_calls"] - 4  # the first query's 4 slices, all segmented (--slice-range off)
    print(f"same support twice: first job {first['encoder_calls']} encoded / {first['cache_hits']} from the cache, "
          f"second {second['encoder_calls']} / {second['cache_hits']}")
    assert first["cache_hits"] == 0 and support_slices >= 1
    assert (second["encoder_calls"], second["cache_hits"]) == (6, support_slices)
    assert any((server.jobs_dir / ".features").iterdir())
    # the same two jobs here, with a local feature cache: the same counts, the same voxels
    cache = tmp_path / "local-features"
    local = []
    for n, query in enumerate((first_query, second_query)):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert _local(["--query", query[0], "--support", *support, "--labels", "3", "--out",
                           str(tmp_path / f"local{n}.nii.gz"), "--method", "propagate", "--slice-range", "off",
                           "--feature-cache", str(cache), "--progress", "json", *MODEL]) == 0
        local.append(json.loads(out.getvalue().splitlines()[-1]))
    assert [(d["encoder_calls"], d["cache_hits"]) for d in local] == [
        (d["encoder_calls"], d["cache_hits"]) for d in done]
    (tmp_path / "remote1.nii.gz").write_bytes(outputs[1])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "remote1.nii.gz"))),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "local1.nii.gz"))))


def _segment_process(argv: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(cli_command("segment", *argv), env=cli_env(), text=True, **kw)


def test_a_job_is_fetched_again_by_id_from_a_new_process(server, cases, tmp_path):
    """The client that submitted a job is killed (SIGKILL: no goodbye to the server); a new process re-attaches by
    the id the first one printed, and writes the local voxels. The job then is gone; another token never sees it."""
    token, other = tmp_path / "token.txt", tmp_path / "other.txt"
    token.write_text(server.tokens["client3"])
    other.write_text(server.tokens["client2"])
    job = ["--query", cases["long"][0], "--support", *cases["support"], "--labels", "3", "--method", "propagate",
           "--slice-range", "off", *MODEL]
    assert _local([*job, "--out", str(tmp_path / "local.nii.gz"),
                   "--feature-cache", str(tmp_path.parent / f"{tmp_path.name}-features")]) == 0
    remote = ["--server", server.url, "--token-file", str(token)]
    first = _segment_process([*job, *remote, "--out", str(tmp_path / "remote.nii.gz"), "--progress", "json"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(first.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    submitted = None
    while submitted is None and first.poll() is None and time.monotonic() < deadline:
        submitted = next((json.loads(x) for x in list(lines) if '"submitted"' in x), None)
        time.sleep(0.05)
    first.kill()  # SIGKILL: the client cannot delete or cancel its job
    first.wait(timeout=30)
    assert submitted is not None and submitted["server"] == server.url, lines
    job_id = submitted["job"]
    assert not (tmp_path / "remote.nii.gz").exists()
    assert server.client("client3").status(job_id)["state"] in ("queued", "running", "done")

    def attach(token_file: Path, out: str, *extra: str) -> subprocess.CompletedProcess:
        p = _segment_process(["--server", server.url, "--token-file", str(token_file), "--attach", job_id, "--out",
                              str(tmp_path / out), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdout, stderr = p.communicate(timeout=600)
        return subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)

    for token_file, out, expect in ((other, "x.nii.gz", "no such job of this token"),  # another client's token
                                    (token, "x.nrrd", "writes a .nii.gz file")):  # the job's own format only
        run = attach(token_file, out)
        assert run.returncode == 2 and expect in run.stderr.strip().splitlines()[-1], run.stderr
    run = attach(token, "remote.nii.gz", "--progress", "json")
    assert run.returncode == 0, run.stderr
    events = [json.loads(line) for line in run.stdout.splitlines()]
    assert events[-1]["event"] == "done" and events[-1]["voxels"]["Label 3"] > 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "remote.nii.gz"))),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "local.nii.gz"))))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local.nii.gz", "other.txt", "remote.nii.gz", "token.txt"]
    run = attach(token, "again.nii.gz")  # fetched and deleted: a second attach finds nothing
    assert run.returncode == 2 and "no such job of this token" in run.stderr


def _extent_argv(shared_dir: Path, query: str) -> list[str]:
    ct = shared_dir / "data" / "abdomen-ct"
    return ["extent", "--query", query, "--support", str(ct / "ct-a" / "image.nii.gz"),
            str(ct / "ct-a" / "labels.nii.gz"), "--labels", "liver=5,spleen=1"]


def test_the_slice_range_estimate_through_the_server_is_the_local_answer(server, shared_dir, tmp_path, capsys):
    """`extent --server` (what Slicer's Estimate runs with Run on: server): the local answer, as JSON and as text."""
    weights = shared_dir / "weights" / "lpips" / "alexnet_features.pth"
    argv = _extent_argv(shared_dir, str(shared_dir / "data" / "abdomen-ct" / "ct-b" / "dicom"))
    token = tmp_path / "token.txt"
    token.write_text(server.tokens["client5"])
    for extra in (["--json"], []):
        capsys.readouterr()
        assert cli.main([*argv, *extra, "--lpips-weights", str(weights)]) == 0
        here = capsys.readouterr().out
        run = run_cli(*argv, *extra, "--server", server.url, "--token-file", token)
        assert run.returncode == 0, run.stderr
        assert run.stdout == here and here.strip()
    assert _jobs_in(server.jobs_dir) == []  # the estimate's job is deleted once its answer is read
    run = run_cli(*argv, "--server", server.url, "--token-file", token, "--lpips-weights", weights, timeout=120)
    assert run.returncode == 2 and "--lpips-weights: not with --server" in run.stderr.strip().splitlines()[-1]


def test_slicers_estimate_runs_on_the_server(server, shared_dir, tmp_path):
    """The Logic's Estimate with a server (Run on: server) on slicer-core's MRML: `extent --server` in its process,
    the token not on its command line, and the ranges of the local Logic estimate."""
    pytest.importorskip("slicer", reason="the Slicer-side helpers need slicer-core")
    import FewShotSAM2 as module
    import slicer
    import vtk
    from FewShotSAM2Lib import remote
    from slicer_scene import add_segment_from_mask, load_volume, new_scene

    data = shared_dir / "data" / "abdomen-ct"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(data / "ct-b" / "dicom")))
    sitk.WriteImage(reader.Execute(), str(tmp_path / "ct-b.nrrd"))
    scene = new_scene()
    support = load_volume(scene, data / "ct-a" / "image.nii.gz", "ct-a")
    labelmap = load_volume(scene, data / "ct-a" / "labels.nii.gz", "ct-a labels", labelmap=True)
    labels = slicer.util.arrayFromVolume(labelmap)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "ct-a segmentation")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(support)
    ijk_to_ras = vtk.vtkMatrix4x4()
    labelmap.GetIJKToRASMatrix(ijk_to_ras)
    ids = {value: add_segment_from_mask(seg, labels == value, ijk_to_ras, name, color)
           for value, name, color in ((5, "liver", (1, 0, 0)), (1, "spleen", (0, 0, 1)))}
    query = load_volume(scene, tmp_path / "ct-b.nrrd", "ct-b")
    supports = [(support, seg, [ids[5], ids[1]])]
    logic = module.FewShotSAM2Logic()
    weights = str(shared_dir / "weights" / "lpips" / "alexnet_features.pth")
    here = logic.estimateSliceRanges(query, supports, lpips_weights=weights)
    token = server.tokens["client6"]
    job = logic.startSliceRangeEstimate(query, supports, server=remote.Server(server.url, token),
                                        lpips_weights=weights)  # a local file: not sent, the server has its own
    command = " ".join(job.process.command)
    assert job.process.command[2:4] == ["fewshotsam2.cli", "extent"] and f"--server {server.url}" in command
    assert token not in command and "--lpips-weights" not in command
    deadline = time.monotonic() + 300
    while not job.finished:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    there = logic.finishSliceRangeEstimate(job)
    assert there == here and there["ranges"]["liver"] is not None
