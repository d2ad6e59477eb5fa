"""The server's jobs: who owns each, the fair queue, the limits, the events a client polls, expiry.

Plain Python, used from the gateway's one event loop (no locks). A job belongs to the token that submitted it;
asked for by any other token it does not exist (404). Waiting jobs are served round-robin over their owners, so a
client with many jobs does not starve the others; past `max_queue` waiting jobs, or `max_per_client` jobs of one
owner, a submission is refused at once with the number of jobs ahead (never left to hang).
"""

from __future__ import annotations

import re
import secrets
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from fewshotsam2.serve.protocol import file_suffix

TERMINAL = ("done", "failed", "cancelled")


class Busy(Exception):
    """The server takes no more jobs now; `ahead` jobs are queued or running before a new one would start."""

    def __init__(self, message: str, ahead: int) -> None:
        super().__init__(message)
        self.ahead = ahead


@dataclass
class Job:
    id: str
    owner: str
    folder: Path
    spec: dict[str, Any]  # what the replica runs (runner.run_job): the server's paths and the options
    outputs: dict[str, str]  # name ("out", "scores") -> path in `folder`
    state: str = "queued"  # queued -> running -> done | failed | cancelled
    created: float = field(default_factory=time.monotonic)
    finished: Optional[float] = None
    attempts: int = 0
    exit_code: Optional[int] = None
    message: str = ""
    cancel_requested: bool = False
    forget_when_done: bool = False
    events: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    next_seq: int = 0
    names: dict[str, str] = field(default_factory=dict)  # server path -> the client's name of it (messages only)

    def own_words(self, text: str) -> str:
        """A message with the server's paths put back as the client named them (its files, --out, --scores): full
        paths, and file names alone (messages often name only the file)."""
        pairs = dict(self.names)
        for path, name in self.names.items():
            if not name.startswith("--"):  # an input: its file name alone too
                pairs.setdefault(Path(path.split("#", 1)[0]).name, Path(name.split("#", 1)[0]).name or name)
        if not pairs:
            return text
        # one pass, longest first: a replaced name is never replaced again
        pattern = "|".join(re.escape(p) for p in sorted(pairs, key=len, reverse=True))
        text = re.sub(r"(?<![\w.-])(?:" + pattern + r")(?![\w-])", lambda m: pairs[m.group(0)], text)
        return text

    @property
    def cancel_file(self) -> Path:
        """The flag the replica's runner checks at every progress step (the replica shares this folder)."""
        return self.folder / "cancel"


class JobStore:
    def __init__(self, root: Path, max_queue: int = 32, max_per_client: int = 8, keep_s: float = 3600.0,
                 max_events: int = 2000) -> None:
        self.root = Path(root)
        self.max_queue, self.max_per_client, self.keep_s, self.max_events = (
            max_queue, max_per_client, keep_s, max_events)
        self.jobs: dict[str, Job] = {}
        self.waiting: dict[str, deque[Job]] = {}
        self.turns: deque[str] = deque()  # owners with waiting jobs, in round-robin order
        self.running: set[str] = set()

    # -- submission
    def n_waiting(self) -> int:
        return sum(len(q) for q in self.waiting.values())

    def admit(self, owner: str) -> None:
        """Raise Busy when a new job of `owner` cannot be queued now (checked before its upload is read)."""
        ahead = self.n_waiting() + len(self.running)
        if self.n_waiting() >= self.max_queue:
            raise Busy(f"server busy, {ahead} jobs ahead; try again later", ahead)
        mine = sum(1 for j in self.jobs.values() if j.owner == owner and j.state in ("queued", "running"))
        if mine >= self.max_per_client:
            raise Busy(f"server busy: you have {mine} jobs queued or running (the limit per client); "
                       "wait for one to finish", ahead)

    def new_folder(self) -> tuple[str, Path]:
        job_id = secrets.token_urlsafe(12)
        folder = self.root / job_id
        folder.mkdir(mode=0o700)
        return job_id, folder

    def add(self, job_id: str, owner: str, folder: Path, spec: dict[str, Any], outputs: dict[str, str]) -> Job:
        job = Job(job_id, owner, folder, spec, outputs)
        self.jobs[job_id] = job
        self._enqueue(job, front=False)
        return job

    def _enqueue(self, job: Job, front: bool) -> None:
        q = self.waiting.setdefault(job.owner, deque())
        q.appendleft(job) if front else q.append(job)
        if job.owner not in self.turns:
            self.turns.appendleft(job.owner) if front else self.turns.append(job.owner)

    # -- dispatch
    def next_job(self) -> Optional[Job]:
        """The next job to run: the first waiting job of the owner whose turn it is."""
        while self.turns:
            owner = self.turns.popleft()
            q = self.waiting.get(owner)
            if not q:
                self.waiting.pop(owner, None)
                continue
            job = q.popleft()
            if q:
                self.turns.append(owner)
            else:
                del self.waiting[owner]
            job.state = "running"
            job.attempts += 1
            self.running.add(job.id)
            return job
        return None

    def requeue(self, job: Job) -> None:
        """A job whose replica died: first in line again."""
        self.running.discard(job.id)
        job.state = "queued"
        self._enqueue(job, front=True)

    def jobs_ahead(self, job: Job) -> int:
        """Jobs that start before `job` (the running ones included), by replaying the round-robin."""
        if job.state != "queued":
            return 0
        queues = {o: list(q) for o, q in self.waiting.items()}
        turns = deque(self.turns)
        ahead = len(self.running)
        while turns:
            owner = turns.popleft()
            q = queues.get(owner)
            if not q:
                continue
            if q.pop(0) is job:
                return ahead
            ahead += 1
            if q:
                turns.append(owner)
        return ahead

    # -- events and the end of a job
    def event(self, job: Job, event: dict[str, Any]) -> None:
        if isinstance(event.get("message"), str):
            event = {**event, "message": job.own_words(event["message"])}
        job.events.append((job.next_seq, event))
        job.next_seq += 1
        if len(job.events) > self.max_events:  # bounded memory: thin out the older progress events
            half = len(job.events) // 2
            old = [e for e in job.events[:half] if e[1].get("event") != "progress"]
            job.events = old[-self.max_events // 4:] + job.events[half:]

    def events_since(self, job: Job, since: int) -> list[dict[str, Any]]:
        return [e for seq, e in job.events if seq >= since]

    def finish(self, job: Job, state: str, exit_code: Optional[int], message: str = "") -> None:
        self.running.discard(job.id)
        job.state, job.exit_code, job.finished = state, exit_code, time.monotonic()
        job.message = job.own_words(message)
        # the inputs go as soon as the job ends; the outputs wait for their fetch (or expiry)
        shutil.rmtree(job.folder / "in", ignore_errors=True)
        if job.forget_when_done:
            self.remove(job)

    # -- client requests
    def get(self, owner: str, job_id: str) -> Optional[Job]:
        """The job `job_id` if `owner` owns it; None otherwise (another client's job looks absent)."""
        job = self.jobs.get(job_id)
        return job if job is not None and secrets.compare_digest(job.owner, owner) else None

    def cancel(self, job: Job) -> None:
        if job.state == "queued":
            q = self.waiting.get(job.owner)
            if q is not None and job in q:
                q.remove(job)
            self.finish(job, "cancelled", 130, "cancelled")
        elif job.state == "running":
            job.cancel_requested = True
            try:
                job.cancel_file.touch()
            except OSError:
                pass

    def delete(self, job: Job) -> None:
        """Forget a job and remove its files (a running job is cancelled first and forgotten when it stops)."""
        if job.state == "running":
            job.forget_when_done = True
            self.cancel(job)
        else:
            self.cancel(job)
            self.remove(job)

    def remove(self, job: Job) -> None:
        self.jobs.pop(job.id, None)
        shutil.rmtree(job.folder, ignore_errors=True)

    def expire(self, now: Optional[float] = None) -> list[str]:
        """Remove the jobs that ended more than keep_s ago (their results were never fetched)."""
        now = time.monotonic() if now is None else now
        gone = [j for j in self.jobs.values() if j.finished is not None and now - j.finished > self.keep_s]
        for j in gone:
            self.remove(j)
        return [j.id for j in gone]

    def status(self, job: Job, since: int = 0) -> dict[str, Any]:
        """What a poll answers; `out_suffix` and `scores` say what the job writes (a client that re-attaches by
        id checks its --out and --scores against them)."""
        out = job.outputs.get("out", "")
        return {"id": job.id, "state": job.state, "jobs_ahead": self.jobs_ahead(job), "attempts": job.attempts,
                "exit_code": job.exit_code, "message": job.message, "events": self.events_since(job, since),
                "next": job.next_seq, "outputs": sorted(job.outputs) if job.state == "done" else [],
                "out_suffix": file_suffix(Path(out).name) if out else None, "scores": "scores" in job.outputs}

    def counts(self) -> dict[str, int]:
        return {"queued": self.n_waiting(), "running": len(self.running), "jobs": len(self.jobs)}
