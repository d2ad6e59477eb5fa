"""The Ray Serve application: a gateway (HTTP, tokens, job store, fair queue) and the model replicas.

`Gateway` (one replica, no CPU reserved) answers every request and owns the jobs; `Worker` (N replicas, one per GPU
by default, `max_ongoing_requests=1`) holds a loaded model and runs one job at a time, streaming its events back.
The gateway hands out at most one job per replica, so nothing waits out of sight inside Ray Serve: a client is told
how many jobs are ahead of its own, and a full queue is refused at once (503).

A replica that dies mid-job ends its event stream with an error: the gateway runs the job again once (Ray Serve
restarts the replica), then reports it failed. Cancel touches the job folder's `cancel` flag, which the replica's
runner checks at every progress step. The job folders live on this machine's disk: on a multi-machine cluster
(`--address`) `--jobs-dir` must be on storage every node mounts at the same path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from fewshotsam2 import __version__
from fewshotsam2.errors import InputError
from fewshotsam2.serve.auth import TokenCheck
from fewshotsam2.serve.jobs import Busy, JobStore
from fewshotsam2.serve.protocol import API_VERSION, check_job_options, file_suffix, unpack_job
from fewshotsam2.serve.runner import EXTENT, SEGMENT, EngineCache, run_job, volume_voxels

# torch is imported in the replica (Worker), not in the `serve` command's process, which only builds the app

MAX_ATTEMPTS = 2  # a job whose replica died is run once more, then reported failed
EXPIRE_EVERY_S = 30.0


@serve.deployment(max_ongoing_requests=1, health_check_period_s=5, health_check_timeout_s=60,
                  graceful_shutdown_timeout_s=5)
class Worker:
    """One loaded model; runs one job at a time in a thread and streams its events."""

    def __init__(self, threads: int, feature_cache: Optional[dict[str, Any]] = None) -> None:
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        cache = None
        if feature_cache is not None:  # one folder for every replica (FeatureCache is safe for several processes)
            from fewshotsam2.model.feature_cache import FeatureCache

            Path(feature_cache["folder"]).mkdir(parents=True, exist_ok=True)  # made by `serve`; again on other nodes
            cache = FeatureCache(feature_cache["folder"], feature_cache["max_bytes"])
        self.engines = EngineCache(cache)
        self.pool = ThreadPoolExecutor(max_workers=1)

    def describe(self) -> dict[str, Any]:
        import torch

        if torch.cuda.is_available():
            device = f"cuda ({torch.cuda.get_device_name(0)})"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = f"cpu ({torch.get_num_threads()} threads)"
        return {"device": device, "torch": torch.__version__, "fewshotsam2": __version__}

    async def run(self, folder: str, spec: dict[str, Any]):
        events: queue.SimpleQueue = queue.SimpleQueue()
        cancel = Path(folder) / "cancel"
        future = asyncio.get_running_loop().run_in_executor(
            self.pool, run_job, spec, events.put, cancel.exists, self.engines)
        yield {"event": "started"}
        while not future.done() or not events.empty():
            try:
                yield events.get_nowait()
            except queue.Empty:
                await asyncio.sleep(0.05)
        code, message = future.result()
        yield {"event": "exit", "code": code, "message": message}


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if status == 503:
        headers = {"Retry-After": "30"}
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


@serve.deployment(num_replicas=1, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
class Gateway:
    """HTTP endpoints (all but /healthz need `Authorization: Bearer TOKEN`):

    GET /healthz, GET /version, POST /jobs (a job archive) -> 201 {id, jobs_ahead} | 503 busy | 413 too large,
    GET /jobs/ID?since=N -> state and events, POST /jobs/ID/cancel, GET /jobs/ID/files/out|scores, DELETE /jobs/ID.
    """

    def __init__(self, worker, config: dict[str, Any]) -> None:
        self.worker = worker
        self.config = config
        root = Path(config["jobs_dir"])
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.store = JobStore(root, max_queue=config["max_queue"], max_per_client=config["max_per_client"],
                              keep_s=config["keep_s"])
        self.auth = TokenCheck(config["tokens"])
        self.slots = int(config["replicas"])
        self.described: dict[str, Any] = {}
        self.wake: Optional[asyncio.Event] = None
        self.tasks: set[asyncio.Task] = set()
        self.describing: Optional[asyncio.Task] = None

    # -- background: dispatch and expiry
    def _ensure_started(self) -> None:
        if self.wake is None:
            self.wake = asyncio.Event()
            self.describing = asyncio.get_running_loop().create_task(self._describe())
            for coroutine in (self._dispatch(), self._expire()):
                task = asyncio.get_running_loop().create_task(coroutine)
                self.tasks.add(task)

    async def _describe(self) -> None:
        try:
            self.described = await asyncio.wait_for(self.worker.describe.remote(), timeout=600)
        except Exception as exc:  # noqa: BLE001  jobs still run; /version says the device is unknown
            self.described = {"device": f"unknown ({exc.__class__.__name__})"}

    async def _dispatch(self) -> None:
        await self.describing  # before the first job takes the replica
        while True:
            while len(self.store.running) < self.slots:
                job = self.store.next_job()
                if job is None:
                    break
                task = asyncio.get_running_loop().create_task(self._run(job))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(EXPIRE_EVERY_S)
            self.store.expire()

    async def _run(self, job) -> None:
        store = self.store
        try:
            exit_event = None
            stream = self.worker.options(stream=True).run.remote(str(job.folder), job.spec)
            async for event in stream:
                if event.get("event") == "exit":
                    exit_event = event
                elif event.get("event") == "started":
                    store.event(job, {"event": "started", "attempt": job.attempts})
                else:
                    store.event(job, event)
            if exit_event is None:
                raise RuntimeError("the replica's event stream ended without the job's end")
            code, message = int(exit_event["code"]), str(exit_event["message"])
            state = "done" if code == 0 else "cancelled" if code == 130 else "failed"
            store.finish(job, state, code, message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001  the replica died or could not be reached
            reason = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if job.cancel_requested:
                store.finish(job, "cancelled", 130, "cancelled")
            elif job.attempts < MAX_ATTEMPTS:
                store.event(job, {"event": "warning", "message": f"the replica running this job stopped ({reason}); "
                                                                  "the job runs again"})
                store.requeue(job)
            else:
                store.finish(job, "failed", 1, f"the replica running this job stopped {job.attempts} times "
                                               f"(last: {reason}); the job was not finished")
        finally:
            if self.wake is not None:
                self.wake.set()

    # -- HTTP
    async def __call__(self, request: Request) -> Response:
        self._ensure_started()
        path = request.url.path.rstrip("/") or "/"
        if path == "/healthz" and request.method == "GET":
            return JSONResponse({"status": "ok"})
        owner = self.auth.owner(request.headers.get("authorization"))
        if owner is None:  # nothing else is looked at, nothing is read or run
            return _error(401, "missing or wrong token")
        parts = path.strip("/").split("/")
        try:
            if parts == ["version"] and request.method == "GET":
                with contextlib.suppress(asyncio.TimeoutError):  # the first answer names the device
                    await asyncio.wait_for(asyncio.shield(self.describing), timeout=60)
                return JSONResponse(self._version())
            if parts == ["jobs"] and request.method == "POST":
                return await self._submit(owner, request)
            if len(parts) >= 2 and parts[0] == "jobs":
                job = self.store.get(owner, parts[1])
                if job is None:
                    return _error(404, "no such job")
                rest = parts[2:]
                if not rest and request.method == "GET":
                    since = request.query_params.get("since", "0")
                    return JSONResponse(self.store.status(job, int(since) if since.isdigit() else 0))
                if not rest and request.method == "DELETE":
                    self.store.delete(job)
                    self.wake.set()
                    return JSONResponse({"deleted": job.id})
                if rest == ["cancel"] and request.method == "POST":
                    self.store.cancel(job)
                    self.wake.set()
                    return JSONResponse(self.store.status(job, job.next_seq))
                if len(rest) == 2 and rest[0] == "files" and request.method == "GET":
                    if job.state != "done" or rest[1] not in job.outputs:
                        return _error(404, "no such output")
                    data = await asyncio.to_thread(Path(job.outputs[rest[1]]).read_bytes)
                    return Response(data, media_type="application/octet-stream")
            return _error(404, "no such endpoint")
        except InputError as exc:
            return _error(400, str(exc))

    def _version(self) -> dict[str, Any]:
        return {"fewshotsam2": __version__, "api": API_VERSION, "kinds": [SEGMENT, EXTENT], "replicas": self.slots,
                "device": self.described.get("device", "starting"), "torch": self.described.get("torch", ""),
                "max_upload_mb": self.config["max_upload_mb"], "max_voxels": self.config["max_voxels"],
                **self.store.counts()}

    async def _submit(self, owner: str, request: Request) -> Response:
        try:
            self.store.admit(owner)
        except Busy as exc:
            return _error(503, str(exc), jobs_ahead=exc.ahead)
        limit = int(self.config["max_upload_mb"] * 2**20)
        length = request.headers.get("content-length", "")
        if not length.isdigit():
            return _error(411, "the upload needs a Content-Length")
        if int(length) > limit:  # refused before a byte of the body is read
            return _error(413, f"upload of {int(length) / 2**20:.0f} MB is over this server's limit "
                               f"({self.config['max_upload_mb']} MB)")
        job_id, folder = self.store.new_folder()
        try:
            archive = folder / "upload.tar"
            received = 0
            with open(archive, "xb") as f:
                async for chunk in request.stream():
                    received += len(chunk)
                    if received > int(length):
                        raise InputError("the upload is longer than its Content-Length")
                    f.write(chunk)
            if received != int(length):
                raise InputError("the upload ended early")
            manifest, inputs = await asyncio.to_thread(unpack_job, archive, folder)
            archive.unlink()
            spec, outputs = self._spec(manifest, inputs, folder)
            largest = max(await asyncio.to_thread(lambda: [volume_voxels(p) for p in inputs]))
            if largest > self.config["max_voxels"]:
                shutil.rmtree(folder, ignore_errors=True)
                return _error(413, f"a volume of {largest} voxels is over this server's limit "
                                   f"({self.config['max_voxels']} voxels)")
            self.store.admit(owner)  # again: others may have submitted while this upload was read
        except Busy as exc:
            shutil.rmtree(folder, ignore_errors=True)
            return _error(503, str(exc), jobs_ahead=exc.ahead)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        job = self.store.add(job_id, owner, folder, spec, outputs)
        names = manifest.get("names")
        if isinstance(names, list) and len(names) == len(inputs) and all(isinstance(n, str) for n in names):
            job.names = {p: n for p, n in zip(inputs, names)}
        if "out" in outputs:
            job.names.update({outputs["out"]: "--out", outputs.get("scores", "--scores"): "--scores"})
        self.wake.set()
        return JSONResponse({"id": job.id, "jobs_ahead": self.store.jobs_ahead(job)}, status_code=201)

    @staticmethod
    def _spec(manifest: dict[str, Any], inputs: list[str], folder: Path) -> tuple[dict[str, Any], dict[str, str]]:
        """What the replica runs: the server's own paths for every file, the client's settings (checked)."""
        def ref(value: Any) -> str:
            if not isinstance(value, int) or not 0 <= value < len(inputs):
                raise InputError("job archive: bad input reference")
            return inputs[value]

        supports = manifest.get("supports")
        if not isinstance(supports, list) or not supports or not all(
                isinstance(s, list) and len(s) == 2 for s in supports):
            raise InputError("job archive: bad support list")
        kind = manifest.get("kind", SEGMENT)
        if kind == EXTENT:  # the slice-range estimate: its answer comes in the done event, no output file
            if not isinstance(manifest.get("labels"), str):
                raise InputError("job archive: bad labels")
            return {"kind": EXTENT, "query": ref(manifest.get("query")), "labels": manifest["labels"],
                    "supports": [[ref(a), ref(b)] for a, b in supports],
                    "options": check_job_options(manifest.get("options", {}))}, {}
        if kind != SEGMENT:
            raise InputError(f"job archive: unknown kind of job {str(kind)[:40]!r}")
        labels, out_suffix = manifest.get("labels"), manifest.get("out_suffix")
        if not isinstance(labels, str) or not isinstance(out_suffix, str) or file_suffix(out_suffix) != out_suffix:
            raise InputError("job archive: bad labels or output format")
        options = check_job_options(manifest.get("options", {}))
        (folder / "out").mkdir()
        outputs = {"out": str(folder / "out" / f"labels{out_suffix}")}
        if manifest.get("scores"):
            outputs["scores"] = str(folder / "out" / "scores.csv")
        spec = {"query": ref(manifest.get("query")), "supports": [[ref(a), ref(b)] for a, b in supports],
                "labels": labels, "out": outputs["out"], "scores": outputs.get("scores"), "options": options}
        return spec, outputs


def build_app(config: dict[str, Any]):
    """The application `serve.run` deploys: `config` from `command.run` (tokens, limits, replicas, resources)."""
    actor = {"num_cpus": config["cpus_per_replica"], "num_gpus": config["gpus_per_replica"]}
    worker = Worker.options(num_replicas=config["replicas"], ray_actor_options=actor).bind(
        config["threads"], config.get("feature_cache"))
    return Gateway.bind(worker, config)
