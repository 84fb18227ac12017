"""The background registration process, without Qt: the Widget calls :meth:`poll` from a
``QTimer``; tests and scripts call :meth:`wait`.

The process is ``<python> -m InverseRegLib register ... --progress json``: one JSON object per
stdout line (``progress``, ``done``, ``error``). A reader thread moves lines into a queue, so
``poll`` never blocks.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import threading
from typing import Callable, Optional

RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"


def register_command(python: str, fixed: str, moving: str, output: str, device: str = "auto",
                     affine: str = "affine", passes: int = 2, refine: int = 0, quality: str = "fast",
                     model: str = "", fixed_labels: str = "", moving_labels: str = "",
                     mutual_inverse: int = 0, mutual_target: float = 0.0) -> list:
    """The command line of one registration. ``--quality`` is passed only for ``best``,
    ``--mutual-inverse`` and ``--mutual-target`` only when above 0, so the default command works
    with a library that does not know these options."""
    if quality not in ("fast", "best"):
        raise ValueError(f"quality must be 'fast' or 'best', not '{quality}'")
    if int(mutual_inverse) < 0:
        raise ValueError(f"mutual-inverse steps must be >= 0, not {mutual_inverse}")
    if not float(mutual_target) >= 0:
        raise ValueError(f"the mutual-inverse target must be >= 0 mm, not {mutual_target}")
    command = [python, "-m", "InverseRegLib", "register", fixed, moving, "-o", output,
               "--device", device, "--affine", affine, "--passes", str(int(passes)),
               "--refine", str(int(refine)), "--progress", "json"]
    if quality == "best":
        command += ["--quality", "best"]
    if int(mutual_inverse) > 0:
        command += ["--mutual-inverse", str(int(mutual_inverse))]
    if float(mutual_target) > 0:  # alone, the command runs at most its own cap of steps
        command += ["--mutual-target", repr(float(mutual_target))]
    if model:
        command += ["--model", model]
    if bool(fixed_labels) != bool(moving_labels):
        raise ValueError("give both label maps (fixed and moving) or neither")
    if fixed_labels:
        command += ["--fixed-seg", fixed_labels, "--moving-seg", moving_labels]
    return command


class RegistrationRunner:
    """One registration process. ``state`` is running, done, failed or cancelled; when done,
    ``output`` is the result folder, when failed ``error`` says why (one line)."""

    def __init__(self, command: list, output: str, env: Optional[dict] = None,
                 on_progress: Optional[Callable[[float, str], None]] = None) -> None:
        self.output, self.on_progress = output, on_progress
        self.state, self.error, self.fraction, self.message = RUNNING, None, 0.0, "starting"
        self.report: Optional[dict] = None
        self._lines: queue.Queue = queue.Queue()
        self._log: list = []
        options = {}
        if os.name == "nt":  # no console window flashing up on Windows
            info = subprocess.STARTUPINFO()
            info.dwFlags |= subprocess.STARTF_USESHOWWINDOW
            info.wShowWindow = 0
            options["startupinfo"] = info
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, text=True, bufsize=1, **options)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._lines.put(line)

    def poll(self) -> list:
        """Drain the events that arrived; update ``state`` when the process has ended. Returns
        the JSON events read by this call."""
        events = []
        while True:
            try:
                line = self._lines.get_nowait().strip()
            except queue.Empty:
                break
            try:
                event = json.loads(line)
            except ValueError:
                if line:
                    self._log.append(line)
                    logging.info("InverseReg: %s", line)
                continue
            if not isinstance(event, dict):
                continue
            events.append(event)
            kind = event.get("event")
            if kind == "progress":
                self.fraction, self.message = float(event.get("fraction", 0.0)), str(event.get("message", ""))
                if self.on_progress:
                    self.on_progress(self.fraction, self.message)
            elif kind == "error":
                self.error = str(event.get("message", "unknown error"))
            elif kind == "done":
                self.report = event.get("report")
        if self.state == RUNNING and self.process.poll() is not None and not self._reader.is_alive() \
                and self._lines.empty():
            code = self.process.returncode
            if self.error is None and code != 0:
                last = self._log[-1] if self._log else ""
                self.error = f"the registration process ended with status {code}" + (f": {last}" if last else "")
            self.state = FAILED if self.error else DONE
        return events

    @property
    def finished(self) -> bool:
        return self.state != RUNNING

    def wait(self, timeout: Optional[float] = None) -> str:
        """Block until the process ends (tests, scripts); returns the final state."""
        self.process.wait(timeout=timeout)
        self._reader.join()
        self.poll()
        return self.state

    def cancel(self) -> None:
        """Kill the process; the caller deletes the folder it made for the run."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=5)
        self.state = CANCELLED


def register_request(request_id: str, fixed: str, moving: str, output: str, device: str = "auto",
                     affine: str = "affine", passes: int = 2, refine: int = 0, quality: str = "fast",
                     model: str = "", fixed_labels: str = "", moving_labels: str = "",
                     mutual_inverse: int = 0, mutual_target: float = 0.0) -> dict:
    """One request for ``inversereg worker``: the same options as :func:`register_command`."""
    command = register_command("python", fixed, moving, output, device, affine, passes, refine, quality, model,
                               fixed_labels, moving_labels, mutual_inverse, mutual_target)
    options = {}
    flags = command[command.index("-o") + 2:]
    for index in range(0, len(flags), 2):
        if flags[index] != "--progress":
            options[flags[index][2:].replace("-", "_")] = flags[index + 1]
    return {"id": request_id, "fixed": fixed, "moving": moving, "output": output, "options": options}


class WorkerJob:
    """One request to a :class:`RegistrationWorker`, with the interface of
    :class:`RegistrationRunner` (``poll``, ``finished``, ``wait``, ``cancel``)."""

    def __init__(self, worker: "RegistrationWorker", request_id: str, output: str,
                 on_progress: Optional[Callable[[float, str], None]] = None) -> None:
        self.worker, self.request_id, self.output, self.on_progress = worker, request_id, output, on_progress
        self.state, self.error, self.fraction, self.message = RUNNING, None, 0.0, "waiting for the worker"
        self.report: Optional[dict] = None
        self.events: queue.Queue = queue.Queue()

    def poll(self) -> list:
        events = []
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                break
            events.append(event)
            kind = event.get("event")
            if kind == "progress":
                self.fraction, self.message = float(event.get("fraction", 0.0)), str(event.get("message", ""))
                if self.on_progress:
                    self.on_progress(self.fraction, self.message)
            elif kind == "error" and self.state == RUNNING:
                self.error, self.state = str(event.get("message", "unknown error")), FAILED
            elif kind == "done" and self.state == RUNNING:
                self.report, self.state = event.get("report"), DONE
            elif kind == "exit" and self.state == RUNNING:
                self.error, self.state = event["message"], FAILED
        return events

    @property
    def finished(self) -> bool:
        return self.state != RUNNING

    def wait(self, timeout: Optional[float] = None) -> str:
        import time
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            self.poll()
            if self.finished:
                return self.state
            if end is not None and time.monotonic() > end:
                raise TimeoutError(f"request {self.request_id} did not finish in {timeout} s")
            time.sleep(0.05)

    def cancel(self) -> None:
        """Kill the worker (the only way to stop a running registration); the next request starts
        a new one."""
        self.worker.stop()
        self.state = CANCELLED


class RegistrationWorker:
    """A persistent ``<python> -m InverseRegLib worker`` process: torch and the network code are
    imported once, so later registrations skip that start-up. Requests run one at a time, in
    order. If the process is gone (cancelled, crashed), :meth:`submit` starts a new one."""

    def __init__(self, python: str, env: Optional[dict] = None) -> None:
        self.python, self.env = python, env
        self.process: Optional[subprocess.Popen] = None
        self._jobs: dict = {}
        self._lock = threading.Lock()
        self._count = 0
        self._log: list = []

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        options = {}
        if os.name == "nt":
            info = subprocess.STARTUPINFO()
            info.dwFlags |= subprocess.STARTF_USESHOWWINDOW
            info.wShowWindow = 0
            options["startupinfo"] = info
        self.process = subprocess.Popen([self.python, "-m", "InverseRegLib", "worker"], env=self.env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, bufsize=1, **options)
        threading.Thread(target=self._read, args=(self.process,), daemon=True).start()

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            line = line.strip()
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if not isinstance(event, dict):
                if line:
                    self._log.append(line)
                    logging.info("InverseReg worker: %s", line)
                continue
            with self._lock:
                job = self._jobs.get(event.get("id"))
            if job is not None:
                job.events.put(event)
            elif event.get("event") == "error":  # a request the worker could not even read
                logging.warning("InverseReg worker: %s", event.get("message"))
        code = process.wait()
        last = self._log[-1] if self._log else ""
        with self._lock:
            pending = list(self._jobs.values())
            self._jobs.clear()
        for job in pending:  # requests the process took with it
            job.events.put({"event": "exit", "message": f"the registration worker ended with status {code}"
                            + (f": {last}" if last else "")})

    def submit(self, fixed: str, moving: str, output: str,
               on_progress: Optional[Callable[[float, str], None]] = None, **options) -> WorkerJob:
        if not self.alive:
            self.start()
        self._count += 1
        request = register_request(str(self._count), fixed, moving, output, **options)
        job = WorkerJob(self, request["id"], output, on_progress)
        with self._lock:
            self._jobs[request["id"]] = job
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return job

    def stop(self) -> None:
        """Kill the process (cancel) or, between requests, end it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None
