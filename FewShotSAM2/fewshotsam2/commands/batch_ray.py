"""`fewshotsam2 batch --ray`: the cases on a Ray cluster (imported only then; Ray is the optional extra `[ray]`).

One actor per GPU (Ray's `num_gpus`), or per `--workers` slot on CPUs; each builds one model, keeps its own
encoded support slices across its cases (as a local batch does) and writes its outputs straight to their paths,
atomically. A worker process that dies (killed, out of host memory) is restarted by Ray (`max_restarts`) and its
case is retried (`max_task_retries`); a case that raises is recorded as failed by the worker and the batch goes on.
The driver only hands the next case to whichever actor finished one (`ray.wait`).

Paths are used as given on every node: on a multi-machine cluster, inputs and outputs must live on a shared file
system. This package is shipped to the workers (`runtime_env` `py_modules`), so they run the driver's code.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import ray
from ray.util.queue import Queue
from tqdm import tqdm

from fewshotsam2.commands.batch import BatchCase, CaseResult, CaseRunner
from fewshotsam2.errors import InputError

LOCAL_OBJECT_STORE = 256 * 2**20  # cases and results are small; Ray's default takes 30% of the RAM
CPUS_PER_WORKER = 4  # default slot size on CPU-only clusters: SAM2's encoder scales to a few threads per model
STAGE_EVERY_S = 0.5  # how often a worker reports its case's stage (progress is best effort, never a cost)


class CaseWorker:
    """A Ray actor: one model and the supports it has encoded, running one case at a time."""

    def __init__(self, options, threads: int) -> None:
        import torch  # in the actor: `serve` imports this module (runtime_env) without loading torch

        torch.set_num_threads(max(1, threads))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the --untrained warning: the driver's users saw the options
            self.runner = CaseRunner(options)
        # warnings reach the driver's terminal: one line each, as the command line prints them
        warnings.formatwarning = lambda message, category, *rest: f"warning: {message}\n"

    def run(self, case: BatchCase, stages=None) -> CaseResult:
        """`stages`: a ray.util.queue.Queue the driver reads the running cases' stages from, or None."""
        last = [0.0]

        def report(text: str, done: int, total: int) -> None:
            nonlocal stages
            now = time.monotonic()
            if stages is None or now - last[0] < STAGE_EVERY_S:
                return
            last[0] = now
            try:
                stages.put_nowait((case.row, f"{case.name}: {text}"))
            except Exception:  # noqa: BLE001  a full or lost queue only costs the progress display
                stages = None

        return self.runner.run(case, progress=report)


def _show_stages(stages, current: dict, running_rows: set, bar) -> None:
    """Take the workers' stage reports off the queue and show those of the running cases."""
    try:
        reports = stages.get_nowait_batch(stages.qsize())
    except Exception:  # noqa: BLE001  progress is best effort
        return
    for row, text in reports:
        if row in running_rows:
            current[row] = text
    if current:
        bar.set_postfix_str(" | ".join(current[r] for r in sorted(current) if r in running_rows))


def runtime_env() -> dict:
    """Ship this package to the workers (Ray allows local folders only for the whole job, in `ray.init`)."""
    package = Path(__file__).resolve().parents[1]  # the whole fewshotsam2 package (this module is in commands/)
    return {"py_modules": [str(package)], "excludes": ["__pycache__", "*.pyc"]}


def start(address: str) -> bool:
    """Connect to (or start) Ray unless this process already did; True when we started it (and shut it down).

    A caller that starts Ray itself passes `runtime_env=runtime_env()`, so that the workers run this code.
    """
    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, configure_logging=False, runtime_env=runtime_env())
    if address == "local":
        ray.init(object_store_memory=LOCAL_OBJECT_STORE, **kwargs)
    else:
        ray.init(address=address, **kwargs)
    return True


def plan_workers(workers: Optional[int], device: str) -> tuple[int, dict]:
    """(number of actors, their resource options) from the cluster's resources."""
    resources = ray.cluster_resources()
    gpus = float(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", 1)))
    if device == "cuda" and gpus < 1:
        raise InputError("--device cuda: the Ray cluster has no GPU (use --device cpu or auto)")
    if gpus >= 1 and device in ("auto", "cuda"):
        n = workers or int(gpus)
        return n, {"num_gpus": min(1.0, gpus / n), "num_cpus": max(1, cpus // n)}
    n = workers or max(1, cpus // CPUS_PER_WORKER)
    return n, {"num_cpus": max(1, cpus // n)}


def run_cases(cases: list[BatchCase], options, record: Callable[[CaseResult], None], quiet: bool = False,
              address: str = "local", workers: Optional[int] = None, retries: int = 2) -> None:
    started = start(address)
    try:
        n, resources = plan_workers(workers, options.device)
        n = min(n, len(cases))
        actor_class = ray.remote(CaseWorker).options(
            max_restarts=-1 if retries else 0,  # restarts are bounded by the per-case retries below
            max_task_retries=retries,
            **resources,
        )
        stages = None
        if not quiet:
            stages = Queue(maxsize=1000, actor_options={"num_cpus": 0})  # takes no slot from the workers
        actors = [actor_class.remote(options, int(resources["num_cpus"])) for _ in range(n)]
        bar = tqdm(total=len(cases), unit="case", desc=f"batch on {n} Ray workers", file=sys.stderr,
                   disable=quiet, dynamic_ncols=True)
        queue, idle, running = list(cases), list(actors), {}
        current: dict[int, str] = {}  # row -> latest stage of the running cases
        try:
            while queue or running:
                while queue and idle:
                    actor, case = idle.pop(0), queue.pop(0)
                    running[actor.run.remote(case, stages)] = (actor, case)
                ready, _ = ray.wait(list(running), num_returns=1, timeout=STAGE_EVERY_S if stages else None)
                if stages is not None:
                    _show_stages(stages, current, {c.row for _, c in running.values()}, bar)
                if not ready:
                    continue
                done = ready[0]
                actor, case = running.pop(done)
                try:
                    result = ray.get(done)
                except ray.exceptions.RayError as exc:  # the worker died more often than --retries allows
                    first = " ".join(str(exc).split())[:300]
                    result = CaseResult(case.row, case.name, case.query, case.output, "failed",
                                        error=f"Ray worker lost or could not start ({type(exc).__name__}): {first}")
                idle.append(actor)
                record(result)
                current.pop(case.row, None)
                bar.update(1)
        finally:
            bar.close()
            for actor in actors:
                ray.kill(actor)
    finally:
        if started:
            ray.shutdown()
