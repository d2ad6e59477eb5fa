"""The server's parts without Ray (fast tier): the job archive, tokens and the listen rule, the job store's fair
queue and ownership, the runner (the real segment at 64 px, cancelled, bad input), and the client's refusals."""

from __future__ import annotations

import argparse
import io
import socket
import tarfile
import time
from pathlib import Path

import pytest

from fewshotsam2 import cli
from fewshotsam2.errors import InputError
from fewshotsam2.serve import auth, protocol
from fewshotsam2.serve.jobs import Busy, JobStore
from fewshotsam2.serve.runner import EngineCache, run_job
from serve_helpers import raw_archive, write_case

MODEL = ["--untrained", "--image-size", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp("case")
    return {"query": write_case(d, 4, 2, 1, "query"), "support": write_case(d, 5, 0, 2, "support"), "dir": d}


# ---------------------------------------------------------------- the job archive

def test_archive_round_trip_uses_only_the_servers_names(case, tmp_path):
    dicom = tmp_path / "series ..%2Fx"  # client names that look like paths: they never travel
    dicom.mkdir()
    for n in range(3):
        (dicom / f"..%2F..%2F{n}.dcm").write_bytes(bytes([n]) * 10)
    buf = io.BytesIO()
    protocol.pack_job(buf, [str(dicom) + "#2", *case["support"]], {"query": 0, "supports": [[1, 2]]})
    (tmp_path / "job.tar").write_bytes(buf.getvalue())
    job = tmp_path / "job"
    job.mkdir()
    manifest, paths = protocol.unpack_job(tmp_path / "job.tar", job)
    assert paths == [f"{job}/in/input0#2", f"{job}/in/input1.nii.gz", f"{job}/in/input2.nii.gz"]
    assert sorted(p.name for p in (job / "in" / "input0").iterdir()) == ["0", "1", "2"]
    assert (job / "in" / "input0" / "2").read_bytes() == bytes([2]) * 10
    assert Path(paths[1]).read_bytes() == Path(case["support"][0]).read_bytes()
    assert manifest["supports"] == [[1, 2]]


@pytest.mark.parametrize("members, entries, expect", [
    ({"i0": b"x", "../evil": b"x"}, [{"kind": "file", "suffix": ".nii.gz"}], "unexpected member"),
    ({"../evil": b"x"}, [{"kind": "file", "suffix": ".nii.gz"}], "i0 is missing"),
    ({"i0": b"x"}, [{"kind": "file", "suffix": "/../../evil"}], "bad input entry"),
    ({"i0/0": b"x"}, [{"kind": "dir", "files": 1, "selector": "/../x"}], "bad input entry"),
])
def test_hostile_archives_are_refused_and_write_nothing_outside(tmp_path, members, entries, expect):
    (tmp_path / "a.tar").write_bytes(raw_archive(members, {"api": protocol.API_VERSION, "inputs": entries}))
    job = tmp_path / "job"
    job.mkdir()
    with pytest.raises(InputError, match=expect):
        protocol.unpack_job(tmp_path / "a.tar", job)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "job"]
    assert not any(p.name == "evil" for p in tmp_path.rglob("*"))


def test_links_in_an_archive_are_refused(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("i0")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    (tmp_path / "a.tar").write_bytes(buf.getvalue())
    (tmp_path / "job").mkdir()
    with pytest.raises(InputError, match="not a plain file"):
        protocol.unpack_job(tmp_path / "a.tar", tmp_path / "job")


def test_options_travel_as_the_same_segment_options():
    from fewshotsam2.options import SegmentOptions
    from fewshotsam2.options import options_from_args

    argv = ["segment", "--query", "q.nii.gz", "--support", "s.nii.gz", "l.nii.gz", "--labels", "3", "--out",
            "o.nii.gz", "--method", "lpips", "--augmentations", "3", "--seed", "-4", "--keep-supports", "--version",
            "2", "--slice-range", "3=1:2", "--server", "https://h:1", "--token-file", "t", "--checkpoint", "c.pt"]
    args = cli.build_parser(argv).parse_args(argv)
    sent = protocol.job_options(args)
    assert not set(sent) & set(protocol.LOCAL_SETTINGS) and sent["keep_supports"] is True
    import json

    received = protocol.check_job_options(json.loads(json.dumps(sent)))  # what crosses the wire
    mine = options_from_args(args).to_flat()
    assert SegmentOptions.from_flat(**received).to_flat() == {**mine, "checkpoint": None}


@pytest.mark.parametrize("bad", [{"checkpoint": "x.pt"}, {"out": "/etc/x.nii.gz"}, {"lpips_weights": "/w"},
                                 {"top_k": [3]}, ["--untrained"]])
def test_the_server_refuses_file_and_unknown_options(bad):
    with pytest.raises(InputError):
        protocol.check_job_options(bad)


# ---------------------------------------------------------------- tokens and where to listen

def test_tokens_are_checked_in_constant_time_and_name_their_owner(tmp_path):
    f = tmp_path / "tokens"
    f.write_text("# the department\nalice:" + "a" * 20 + "\n" + "b" * 20 + "  # bob\n")
    tokens = auth.read_tokens(str(f))
    assert list(tokens.values()) == ["alice", "client2"]
    check = auth.TokenCheck(tokens)
    alice, bob = check.owner("Bearer " + "a" * 20), check.owner("bearer " + "b" * 20)
    assert alice and bob and alice != bob and check.name(alice) == "alice"
    assert "a" * 20 not in alice  # the owner id is a digest, not the token
    for wrong in (None, "", "Bearer", "Bearer " + "a" * 19, "Bearer " + "a" * 21, "Basic " + "a" * 20, "a" * 20):
        assert check.owner(wrong) is None
    assert auth.client_token(str(f)) == "a" * 20


@pytest.mark.parametrize("text, expect", [("short", "at least 16"), ("x:" + "a" * 20 + "\ny:" + "a" * 20, "twice"),
                                          ("# nothing\n", "no token")])
def test_bad_token_files_are_refused(tmp_path, text, expect):
    (tmp_path / "t").write_text(text)
    with pytest.raises(InputError, match=expect):
        auth.read_tokens(str(tmp_path / "t"))


def test_listening_beyond_loopback_needs_a_token_file_and_tls_or_insecure():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        auth.check_listen(host, token_file=False, tls=False, insecure=False)
    with pytest.raises(InputError, match="--token-file"):
        auth.check_listen("0.0.0.0", token_file=False, tls=True, insecure=False)
    with pytest.raises(InputError, match="--tls-cert"):
        auth.check_listen("0.0.0.0", token_file=True, tls=False, insecure=False)
    auth.check_listen("0.0.0.0", token_file=True, tls=True, insecure=False)
    auth.check_listen("0.0.0.0", token_file=False, tls=False, insecure=True)


@pytest.mark.parametrize("argv, expect", [
    (["--host", "0.0.0.0"], "--token-file"),
    (["--host", "10.1.2.3", "--token-file", "TOKENS"], "--tls-cert and --tls-key"),
    (["--tls-cert", "c.pem"], "go together"),
    (["--max-upload-mb", "0"], "must be positive"),
    (["--replicas", "2", "--gpus-per-replica", "0.5"], "not allowed with"),
    (["--feature-cache-size", "0"], "must be positive"),
    (["--feature-cache", "TOKENS/features"], "cannot use feature cache folder"),  # under a file
])
def test_serve_refuses_before_starting_ray(argv, expect, tmp_path, capsys):
    (tmp_path / "tokens").write_text("a" * 20)
    argv = [a.replace("TOKENS", str(tmp_path / "tokens")) for a in argv]
    try:
        rc = cli.main(["serve", *argv])
    except SystemExit as exc:  # argparse's own refusals (usage + one line)
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2 and expect in err.splitlines()[-1], err


# ---------------------------------------------------------------- the job store

def _store(tmp_path, **kw) -> JobStore:
    return JobStore(tmp_path, **{"max_queue": 5, "max_per_client": 3, **kw})


def _add(store, owner):
    job_id, folder = store.new_folder()
    return store.add(job_id, owner, folder, [], {})


def test_waiting_jobs_are_served_round_robin_and_ahead_is_exact(tmp_path):
    store = _store(tmp_path, max_queue=10)
    a = [_add(store, "A") for _ in range(3)]
    b, c = _add(store, "B"), _add(store, "C")
    predicted = {j.id: store.jobs_ahead(j) for j in a + [b, c]}
    order = [store.next_job() for _ in range(5)]
    assert [j.owner for j in order] == ["A", "B", "C", "A", "A"]
    assert [predicted[j.id] for j in order] == [0, 1, 2, 3, 4]
    assert store.next_job() is None and all(j.state == "running" for j in order)


def test_full_queue_and_per_client_limit_say_busy_at_once(tmp_path):
    store = _store(tmp_path)
    for _ in range(3):
        store.admit("A")
        _add(store, "A")
    with pytest.raises(Busy, match="you have 3 jobs"):
        store.admit("A")
    for _ in range(2):
        store.admit("B")
        _add(store, "B")
    with pytest.raises(Busy, match="server busy, 5 jobs ahead") as exc:
        store.admit("C")
    assert exc.value.ahead == 5


def test_a_job_belongs_to_its_owner(tmp_path):
    store = _store(tmp_path)
    job = _add(store, "A")
    assert store.get("A", job.id) is job
    assert store.get("B", job.id) is None and store.get("A", "nope") is None


def test_requeue_cancel_delete_and_expiry(tmp_path):
    store = _store(tmp_path, keep_s=10)
    first, second = _add(store, "A"), _add(store, "B")
    running = store.next_job()
    store.requeue(running)  # its replica died: first in line again
    assert store.next_job() is first and first.attempts == 2
    store.cancel(second)  # waiting: cancelled at once
    assert second.state == "cancelled" and store.next_job() is None
    store.cancel(first)  # running: the replica's flag
    assert first.cancel_requested and first.cancel_file.exists() and first.state == "running"
    store.delete(first)
    assert first.id in store.jobs  # forgotten when its run ends
    store.finish(first, "cancelled", 130)
    assert first.id not in store.jobs and not first.folder.exists()
    store.expire(now=time.monotonic() + 11)
    assert store.jobs == {} and list(tmp_path.iterdir()) == []


def test_events_stay_bounded_and_polls_resume(tmp_path):
    store = _store(tmp_path)
    job = _add(store, "A")
    store.event(job, {"event": "warning", "message": "kept"})
    for n in range(10_000):
        store.event(job, {"event": "progress", "stage": "s", "done": n, "total": 10_000})
    assert len(job.events) <= store.max_events
    assert store.events_since(job, 0)[0]["message"] == "kept"
    assert store.events_since(job, job.next_seq - 1) == [{"event": "progress", "stage": "s", "done": 9999,
                                                          "total": 10_000}]


def test_messages_name_the_clients_files(tmp_path):
    store = _store(tmp_path)
    job = _add(store, "A")
    job.names = {"/srv/job/in/input2.nii.gz": "mine/labels.nii.gz", "/srv/job/in/input12.nii.gz": "b.nii.gz",
                 "/srv/job/out/labels.nii.gz": "--out"}
    store.event(job, {"event": "warning", "message": "/srv/job/in/input2.nii.gz: odd; input2.nii.gz, input12.nii.gz"})
    store.finish(job, "failed", 2, "cannot write /srv/job/out/labels.nii.gz")
    assert job.events[0][1]["message"] == "mine/labels.nii.gz: odd; labels.nii.gz, b.nii.gz"
    assert job.message == "cannot write --out"


# ---------------------------------------------------------------- the runner (the real segment, 64 px)

OPTIONS = {"untrained": True, "image_size": 64, "device": "cpu", "slice_range": "off"}


def _spec(case, out: Path, **options) -> dict:
    return {"query": case["query"][0], "supports": [list(case["support"])], "labels": "3", "out": str(out),
            "scores": None, "options": {**OPTIONS, **options}}


def _job_argv(case, out: Path) -> list[str]:
    return ["--query", case["query"][0], "--support", *case["support"], "--labels", "3", "--out", str(out),
            "--slice-range", "off", *MODEL]


def test_runner_gives_the_events_and_output_of_segment(case, tmp_path, engine64):
    events = []
    code, message = run_job(_spec(case, tmp_path / "o.nii.gz"), events.append, lambda: False,
                            engine_factory=lambda options: engine64)
    assert (code, message) == (0, "")
    assert events[-1]["event"] == "done" and events[-1]["voxels"]["Label 3"] > 0
    assert any(e["event"] == "progress" for e in events) and (tmp_path / "o.nii.gz").is_file()


def test_runner_cancel_and_bad_input_write_nothing(case, tmp_path, engine64):
    seen = []
    code, message = run_job(_spec(case, tmp_path / "o.nii.gz"), seen.append,
                            lambda: any(e["event"] == "progress" and "Label" in e["stage"] for e in seen),
                            engine_factory=lambda options: engine64)
    assert (code, message) == (130, "cancelled") and not any(e["event"] == "done" for e in seen)
    code, message = run_job(_spec(case, tmp_path / "o.nii.gz", top_k=0), seen.append, lambda: False)
    assert code == 2 and message.startswith("--top-k")
    code, message = run_job(_spec(case, tmp_path / "o.nii.gz", nonsense=1), seen.append, lambda: False)
    assert code == 2 and "nonsense" in message
    code, message = run_job({**_spec(case, tmp_path / "o.nii.gz"), "labels": "9"}, seen.append, lambda: False)
    assert code == 2 and "label '9' is absent" in message
    assert list(tmp_path.iterdir()) == []


def test_engine_cache_reuses_the_model_while_settings_are_equal(tmp_path):
    from fewshotsam2.model.feature_cache import FeatureCache
    from fewshotsam2.options import SegmentOptions

    features = FeatureCache(tmp_path, 10**9)
    cache = EngineCache(features)
    small = SegmentOptions.from_flat(untrained=True, image_size=64, device="cpu")
    first = cache(small)
    assert cache(SegmentOptions.from_flat(untrained=True, image_size=64, device="cpu", method="propagate")) is first
    other = cache(SegmentOptions.from_flat(untrained=True, image_size=128, device="cpu"))
    assert other is not first and other.feature_cache is features  # every model the replica builds keeps features


def test_runner_reads_a_seen_support_from_the_feature_cache(case, tmp_path, engine64):
    """What a replica does with its feature cache: the second job with the same support encodes only its query."""
    from fewshotsam2.model.feature_cache import FeatureCache

    other = write_case(tmp_path, 6, 1, 7, "other")  # another query, the same support
    kept = engine64.feature_cache
    (tmp_path / "features").mkdir()
    engine64.feature_cache = FeatureCache(tmp_path / "features", 10**9)
    done = []
    try:
        for n, query in enumerate((case["query"], other, other)):
            events = []
            spec = {**_spec(case, tmp_path / f"o{n}.nii.gz", method="propagate"), "query": query[0]}
            result = run_job(spec, events.append, lambda: False, engine_factory=lambda options: engine64)
            assert result == (0, ""), result
            done.append(events[-1])
    finally:
        engine64.feature_cache = kept
    first, second, again = done
    support_slices = first["encoder_calls"] - 4  # the first query has 4 slices, all segmented (--slice-range off)
    assert first["cache_hits"] == 0 and support_slices >= 1
    assert (second["encoder_calls"], second["cache_hits"]) == (6, support_slices)  # no support slice encoded again
    assert (again["encoder_calls"], again["cache_hits"]) == (0, 6 + support_slices)
    assert again["voxels"] == second["voxels"]


# ---------------------------------------------------------------- the client's refusals (no server needed)

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("extra, expect", [
    (["--server", "http://127.0.0.1:{port}", "--token-file", "TOKEN"], "cannot reach the server http://127.0.0.1"),
    (["--server", "http://127.0.0.1:{port}"], "--server needs a token"),
    (["--server", "ftp://x", "--token-file", "TOKEN"], "give http://HOST:PORT"),
    (["--server", "http://127.0.0.1:{port}", "--token-file", "TOKEN", "--checkpoint", "c.pt"], "--checkpoint: not with"),
    (["--attach", "abc"], "--attach needs --server"),
    (["--server", "http://127.0.0.1:{port}", "--token-file", "TOKEN", "--attach", "abc"],
     "--attach: the job's inputs are on the server; leave out --query, --support, --labels"),
])
def test_client_errors_are_one_line_and_write_nothing(case, tmp_path, capsys, monkeypatch, extra, expect):
    monkeypatch.delenv(auth.TOKEN_ENV, raising=False)
    (tmp_path / "token").write_text("t" * 20)
    port = _closed_port()
    extra = [a.replace("TOKEN", str(tmp_path / "token")).replace("{port}", str(port)) for a in extra]
    rc = cli.main(["segment", *_job_argv(case, tmp_path / "o.nii.gz"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("fewshotsam2: error: ") and expect in err[-1], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token"]


# ---------------------------------------------------------------- Slicer's Run on choice (Qt-free part)

def test_slicer_run_on_choice_needs_an_address_and_a_token():
    from FewShotSAM2Lib import remote

    assert remote.serverFromChoice("local", "", "") is None
    server = remote.serverFromChoice("server", " https://gpu:8000 ", " tok ")
    assert server.arguments() == ["--server", "https://gpu:8000"]
    assert server.environment() == {auth.TOKEN_ENV: "tok"}  # the token goes by environment, never the command line
    for url, token, expect in (("gpu:8000", "tok", "https://HOST:PORT"), ("https://gpu:8000", " ", "token")):
        with pytest.raises(ValueError, match=expect):
            remote.serverFromChoice("server", url, token)


def test_versions_that_differ_are_refused_or_said():
    from fewshotsam2 import __version__
    from fewshotsam2.serve.client import ServerError, check_compatible

    with pytest.raises(ServerError, match="server API 99"):
        check_compatible({"api": 99, "fewshotsam2": "9.9"}, "https://h:1")
    with pytest.warns(UserWarning, match="runs fewshotsam2 0.0.1, this client"):
        check_compatible({"api": protocol.API_VERSION, "fewshotsam2": "0.0.1"}, "https://h:1")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_compatible({"api": protocol.API_VERSION, "fewshotsam2": __version__}, "https://h:1")


def test_runner_estimates_slice_ranges_as_the_extent_command(case, shared_dir, capsys, monkeypatch):
    """A server's `extent` job (Slicer's Estimate with Run on: server): the answer of `fewshotsam2 extent --json`,
    in the done event (the server's LPIPS weights: its $FEWSHOTSAM2_LPIPS_WEIGHTS; clients send no file)."""
    import json

    weights = str(shared_dir / "weights" / "lpips" / "alexnet_features.pth")
    assert cli.main(["extent", "--query", case["query"][0], "--support", *case["support"], "--labels", "3", "--json",
                     "--lpips-weights", weights]) == 0
    expected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    events = []
    monkeypatch.setenv("FEWSHOTSAM2_LPIPS_WEIGHTS", weights)
    spec = {"kind": "extent", "query": case["query"][0], "supports": [list(case["support"])], "labels": "3",
            "options": {"preset": "auto"}}
    assert run_job(spec, events.append, lambda: False) == (0, "")
    done = events[-1]
    assert done["event"] == "done" and {k: done["extent"][k] for k in ("axis", "structures")} == expected
    assert done["extent"]["n_slices"] == 4
    assert run_job({**spec, "labels": "9"}, events.append, lambda: False)[0] == 2


def test_extent_on_a_server_refuses_local_weight_files(case, tmp_path, capsys):
    (tmp_path / "token").write_text("t" * 20)
    rc = cli.main(["extent", "--query", case["query"][0], "--support", *case["support"], "--labels", "3",
                   "--server", "http://127.0.0.1:9", "--token-file", str(tmp_path / "token"), "--lpips-weights", "w.pth"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1] == ("fewshotsam2: error: --lpips-weights: not with --server (the server uses its own "
                                   "model files)"), err
