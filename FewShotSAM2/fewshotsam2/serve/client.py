"""`fewshotsam2 segment --server URL`: the same job on a `fewshotsam2 serve` server, the same outputs and exit codes.

Standard library only (no Ray on a workstation). The outputs are checked before anything is uploaded, written
atomically after the download, and the job is deleted from the server once fetched. Ctrl-C / SIGTERM / Cancel in
Slicer cancels the job on the server. A lost connection is retried for RECONNECT_S seconds (the job lives on);
every server-side problem ends in one line: unreachable, wrong token, busy, too large, versions that differ.
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import IO, Any, Optional

from fewshotsam2 import __version__
from fewshotsam2.commands.extent_command import print_extent
from fewshotsam2.errors import Cancelled, InputError
from fewshotsam2.io.atomic import atomic_path
from fewshotsam2.io.paths import check_output_file, refuse_overwriting_inputs
from fewshotsam2.options import check_overlap_output, options_from_args
from fewshotsam2.protocol import SUBMITTED, JsonEvents, check_parent_alive
from fewshotsam2.run.progress import ProgressBar
from fewshotsam2.serve.auth import client_token
from fewshotsam2.serve.protocol import API_VERSION, FILE_SUFFIXES, file_suffix, job_options, pack_job

# pure Python at import (no numpy, SimpleITK or torch): the Slicer module imports this client in Slicer's own Python

POLL_S = 0.5
RECONNECT_S = 120.0  # how long a lost server is retried before the client gives up (the job goes on there)
TERMINAL = ("done", "failed", "cancelled")


class ServerError(InputError):
    """A problem with the server (unreachable, token refused, busy, ...): one line, exit code 2."""

    def __init__(self, message: str, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.status = status


class Client:
    """The server's HTTP API; every failure is a ServerError with a message for people."""

    def __init__(self, url: str, token: str, timeout: float = 60.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise InputError(f"--server {url}: give http://HOST:PORT or https://HOST:PORT")
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def request(self, method: str, path: str, body: Optional[IO[bytes]] = None, length: int = 0,
                timeout: Optional[float] = None) -> Any:
        headers = {"Authorization": f"Bearer {self.token}", "User-Agent": f"fewshotsam2/{__version__}"}
        if body is not None:
            headers.update({"Content-Type": "application/x-tar", "Content-Length": str(length)})
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as response:
                data = response.read()
                kind = response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            raise self._http_error(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise ServerError(f"{self.url}: the server's TLS certificate is not trusted ({reason.verify_message}); "
                                  "give its CA certificate in $SSL_CERT_FILE") from None
            raise ServerError(f"cannot reach the server {self.url}: {reason}") from None
        return json.loads(data) if kind.startswith("application/json") else data

    def _http_error(self, exc: urllib.error.HTTPError) -> ServerError:
        try:
            message = json.loads(exc.read()).get("error", "")
        except (ValueError, AttributeError, OSError):
            message = ""
        if exc.code == 401:
            return ServerError(f"{self.url} refused the token (wrong or missing): check --token-file or the token "
                               "in Slicer's server settings", 401)
        if exc.code == 404 and not message.startswith("no such job"):
            return ServerError(f"{self.url}: not a FewShotSAM2 server ({exc.code} {exc.reason})", 404)
        return ServerError(f"server: {message or exc.reason}", exc.code)

    def version(self) -> dict:
        return self.request("GET", "/version")

    def submit(self, archive: IO[bytes], length: int) -> dict:
        return self.request("POST", "/jobs", body=archive, length=length, timeout=max(self.timeout, 600))

    def status(self, job: str, since: int = 0) -> dict:
        return self.request("GET", f"/jobs/{job}?since={since}")

    def cancel(self, job: str) -> dict:
        return self.request("POST", f"/jobs/{job}/cancel", timeout=10)

    def fetch(self, job: str, name: str) -> bytes:
        return self.request("GET", f"/jobs/{job}/files/{name}", timeout=max(self.timeout, 600))

    def delete(self, job: str) -> dict:
        return self.request("DELETE", f"/jobs/{job}", timeout=10)


def check_compatible(version: dict, url: str) -> None:
    """Refuse a server of another API version; warn when the package versions differ."""
    if version.get("api") != API_VERSION:
        raise ServerError(f"{url} runs fewshotsam2 {version.get('fewshotsam2', '?')} (server API "
                          f"{version.get('api', '?')}); this client is {__version__} (API {API_VERSION}): "
                          "update the older one")
    if version.get("fewshotsam2") != __version__:
        warnings.warn(f"{url} runs fewshotsam2 {version.get('fewshotsam2')}, this client {__version__}: results "
                      "may differ from a local run")


def run_remote(args: argparse.Namespace) -> int:
    """`segment --server`: check here, upload, follow the job, download the outputs. Returns the exit code."""
    from fewshotsam2.io.volume import check_output_path  # SimpleITK: see the note at the top

    for flag, value in (("--checkpoint", args.checkpoint), ("--cache-dir", args.cache_dir),
                        ("--lpips-weights", args.lpips_weights)):
        if value:
            raise InputError(f"{flag}: not with --server (the server uses its own model files)")
    options = options_from_args(args)  # bad options fail here, before any upload
    refuse_overwriting_inputs([("--out", args.out), ("--scores", args.scores)],
                              [args.query, *(p for pair in args.support for p in pair)])
    check_output_path(args.out)
    check_overlap_output(options.overlap, args.out)
    if file_suffix(args.out) is None:
        raise InputError(f"--out {args.out}: with --server, one of {', '.join(FILE_SUFFIXES)}")
    if args.scores:
        if options.method == "propagate":
            raise InputError("--scores: --method propagate has no per-slice scores (reverse and lpips have); "
                             "leave --scores out or choose another method")
        check_output_file(args.scores, ".csv")
    json_lines = args.progress == "json"
    client = Client(args.server, client_token(args.token_file))
    version = _checked_version(client, json_lines)

    inputs = [args.query, *(p for pair in args.support for p in pair)]
    manifest = {"query": 0, "supports": [[1 + 2 * n, 2 + 2 * n] for n in range(len(args.support))],
                "labels": args.labels, "out_suffix": file_suffix(args.out), "scores": bool(args.scores),
                "options": job_options(args),
                "names": inputs}  # only for messages: the server never uses a client's name as a path
    bar = None if json_lines or args.quiet else ProgressBar()
    progress = _progress(json_lines, bar)
    job = None
    clock = {"start": time.monotonic()}  # where the time goes: upload, waiting for a replica, download
    try:
        progress("Uploading", 0, 0)
        job, length = _upload(client, version, inputs, manifest)
        _say_submitted(client, job, args, json_lines, bar)
        clock["uploaded"] = time.monotonic()
        return _finish(client, job, args, progress, json_lines, bar, clock, upload_mb=length / 2**20)
    except (KeyboardInterrupt, Cancelled):
        if job is not None:
            _cancel_quietly(client, job)
        raise
    finally:
        if bar is not None:
            bar.close()


def _upload(client: Client, version: dict, inputs: list[str], manifest: dict) -> tuple[str, int]:
    """Pack the job archive (a temporary file), check it against the server's limit, submit it: (job id, bytes)."""
    with tempfile.TemporaryFile() as archive:
        pack_job(archive, inputs, manifest)
        length = archive.tell()
        limit = version.get("max_upload_mb")
        if limit and length > limit * 2**20:
            raise ServerError(f"the upload ({length / 2**20:.0f} MB) is over the server's limit ({limit:g} MB)")
        archive.seek(0)
        return client.submit(archive, length)["id"], length


def run_remote_extent(args: argparse.Namespace) -> int:
    """`extent --server`: the slice-range estimate on the server, the same answer on stdout as a local `extent`.
    (The Slicer module's Estimate button runs this when Run on: server is chosen.)"""

    if args.lpips_weights:
        raise InputError("--lpips-weights: not with --server (the server uses its own model files)")
    options_from_args(args)  # bad options fail here, before any upload
    client = Client(args.server, client_token(args.token_file))
    version = _checked_version(client, json_lines=False)
    if "extent" not in version.get("kinds", ["segment"]):
        raise ServerError(f"{client.url} runs fewshotsam2 {version.get('fewshotsam2', '?')}, which cannot estimate "
                          "slice ranges: update the server")
    inputs = [args.query, *(p for pair in args.support for p in pair)]
    manifest = {"kind": "extent", "query": 0, "supports": [[1 + 2 * n, 2 + 2 * n] for n in range(len(args.support))],
                "labels": args.labels, "options": job_options(args), "names": inputs}
    job = None
    try:
        job, _length = _upload(client, version, inputs, manifest)
        done = _follow(client, job, lambda stage, done, total: None, False, None, check_parent_alive, {})
    except (KeyboardInterrupt, Cancelled):
        if job is not None:
            _cancel_quietly(client, job)
        raise
    _delete_quietly(client, job)
    print_extent(done["extent"], args.query, args.json)
    return 0


def attach_remote(args: argparse.Namespace) -> int:
    """`segment --server URL --attach JOB --out ...`: follow a job this token submitted earlier (from a client that
    stopped: killed, lost its connection, the machine went to sleep), then fetch and delete it as `--server` does.
    The inputs are already on the server: --query, --support and --labels are refused."""
    from fewshotsam2.io.volume import check_output_path  # SimpleITK: see the note at the top

    given = [f for f, v in (("--query", args.query), ("--support", args.support), ("--labels", args.labels)) if v]
    if given:
        raise InputError(f"--attach: the job's inputs are on the server; leave out {', '.join(given)}")
    check_output_path(args.out)
    if args.scores:
        check_output_file(args.scores, ".csv")
    json_lines = args.progress == "json"
    client = Client(args.server, client_token(args.token_file))
    _checked_version(client, json_lines)
    try:
        status = client.status(args.attach)
    except ServerError as exc:
        if exc.status == 404:
            raise ServerError(f"--attach {args.attach}: no such job of this token on {client.url} (fetched already, "
                              "removed after the server's --keep-minutes, or submitted with another token)") from None
        raise
    suffix = status.get("out_suffix")
    if suffix and file_suffix(args.out) != suffix:
        raise InputError(f"--out {args.out}: job {args.attach} writes a {suffix} file; give an --out ending in {suffix}")
    if args.scores and not status.get("scores"):
        raise InputError(f"--scores: job {args.attach} was submitted without --scores")
    bar = None if json_lines or args.quiet else ProgressBar()
    clock = {"start": time.monotonic(), "uploaded": time.monotonic()}
    try:
        return _finish(client, args.attach, args, _progress(json_lines, bar), json_lines, bar, clock, upload_mb=0.0)
    except (KeyboardInterrupt, Cancelled):
        _cancel_quietly(client, args.attach)  # as with the client that submitted it: Ctrl-C cancels the job
        raise
    finally:
        if bar is not None:
            bar.close()


def _checked_version(client: Client, json_lines: bool) -> dict:
    """The server's /version, refused when its API differs; a package version that differs is a warning (an event
    line with --progress json, so that Slicer shows it)."""
    version = client.version()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_compatible(version, client.url)
    for w in caught:
        _events().warning(str(w.message)) if json_lines else print(f"warning: {w.message}", file=sys.stderr)
    return version


def _progress(json_lines: bool, bar):
    events = _events()

    def progress(stage: str, done: int, total: int) -> None:
        if json_lines:
            events.line(event="progress", stage=stage, done=done, total=total)
        elif bar is not None:
            bar(stage, done, total)

    return progress


def _say_submitted(client: Client, job: str, args: argparse.Namespace, json_lines: bool, bar) -> None:
    """The job's id, at once: a client that stops (killed, disconnected) can be replaced by `--attach` later."""
    if json_lines:
        _events().line(event=SUBMITTED, job=job, server=client.url)
        return
    if bar is not None:
        bar.close()
    token = f" --token-file {args.token_file}" if args.token_file else ""
    print(f"job {job} on {client.url} (should this client stop, fetch the result with: fewshotsam2 segment "
          f"--server {client.url}{token} --attach {job} --out {args.out})", file=sys.stderr, flush=True)


def _finish(client: Client, job: str, args: argparse.Namespace, progress, json_lines: bool, bar, clock: dict,
            upload_mb: float) -> int:
    """Follow the job to its end, write its outputs (each atomically), delete it on the server, report."""
    done_event = _follow(client, job, progress, json_lines, bar, check_parent_alive, clock)
    clock["finished"] = time.monotonic()
    # outputs are written only now, each atomically: a failed or cancelled job leaves nothing behind
    for name, path in (("out", args.out), ("scores", args.scores)):
        if path:
            data = client.fetch(job, name)
            with atomic_path(path) as tmp:
                Path(tmp).write_bytes(data)
    _delete_quietly(client, job)
    clock["end"] = time.monotonic()
    done_event["transfer"] = {
        "upload_mb": round(upload_mb, 2), "upload_s": round(clock["uploaded"] - clock["start"], 3),
        "until_started_s": round(clock.get("started", clock["finished"]) - clock["uploaded"], 3),
        "download_s": round(clock["end"] - clock["finished"], 3), "total_s": round(clock["end"] - clock["start"], 3)}
    voxels, ranges = done_event.get("voxels", {}), done_event.get("slice_ranges", {})
    if json_lines:
        _events().line(**{**done_event, "out": str(args.out), "server": client.url})
        return 0
    if bar is not None:
        bar.close()
    for name in voxels:
        r = ranges.get(name)
        print(f"{name}: segmented slices {r[0]}-{r[1]} along array axis {done_event.get('slice_axis')}" if r
              else f"{name}: empty slice range, not segmented")
    counts = ", ".join(f"{name}: {n} voxels" for name, n in voxels.items())
    print(f"wrote {args.out} ({counts}; {done_event.get('encoder_calls')} slices encoded, "
          f"{float(done_event.get('seconds', 0)):.1f} s on {client.url}, {done_event.get('device', '')})")
    return 0


def _follow(client: Client, job: str, progress, json_lines: bool, bar, still_wanted, clock: dict) -> dict:
    """Poll the job until it ends; pass its events on. Returns the done event; raises for a failed job."""
    since, ahead, lost_since, done = 0, None, None, {}
    while True:
        still_wanted()  # raises Cancelled when the program that started this run is gone
        try:
            status = client.status(job, since)
            lost_since = None
        except ServerError as exc:
            if exc.status is not None:  # the server answered: no point retrying
                raise
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since > RECONNECT_S:
                raise ServerError(f"{exc}; the job {job} may still run there") from None
            time.sleep(2 * POLL_S)
            continue
        for event in status["events"]:
            kind = event.get("event")
            if kind == "progress":
                progress(event["stage"], event["done"], event["total"])
            elif kind == "warning":
                if json_lines:
                    _events().warning(event["message"])
                else:
                    if bar is not None:
                        bar.close()
                    print(f"warning: {event['message']}", file=sys.stderr)
            elif kind == "done":
                done = event
            elif kind == "started":
                clock.setdefault("started", time.monotonic())
        since = status["next"]
        if status["state"] == "queued" and status["jobs_ahead"] != ahead:
            ahead = status["jobs_ahead"]
            progress(f"Waiting for the server ({ahead} jobs ahead)", 0, 0)
        if status["state"] in TERMINAL:
            break
        time.sleep(POLL_S)
    if status["state"] == "done":
        return done
    _delete_quietly(client, job)
    if status["state"] == "cancelled":
        raise Cancelled(status["message"])
    if status["exit_code"] == 2:
        raise InputError(status["message"])
    raise ServerError(f"the job failed on the server: {status['message']}")


def _events():
    """The `--progress json` lines, written to stdout as a local run writes them (protocol.JsonEvents)."""
    return JsonEvents(sys.stdout)


def _cancel_quietly(client: Client, job: str) -> None:
    """Cancel and forget the job on the way out (Ctrl-C, Slicer's Cancel); a server that is gone is not waited for."""
    try:
        client.delete(job)
    except (ServerError, socket.timeout, OSError):
        pass


def _delete_quietly(client: Client, job: Optional[str]) -> None:
    if job is not None:
        _cancel_quietly(client, job)
