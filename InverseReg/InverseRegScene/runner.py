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
                     model: str = "", fixed_labels: str = "", moving_labels: str = "") -> list:
    """The command line of one registration. ``--quality`` is passed only for ``best``, so the
    default command works with a library that does not know the option."""
    if quality not in ("fast", "best"):
        raise ValueError(f"quality must be 'fast' or 'best', not '{quality}'")
    command = [python, "-m", "InverseRegLib", "register", fixed, moving, "-o", output,
               "--device", device, "--affine", affine, "--passes", str(int(passes)),
               "--refine", str(int(refine)), "--progress", "json"]
    if quality == "best":
        command += ["--quality", "best"]
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
