"""``inversereg worker``: a persistent registration process (what the Slicer module keeps
running, so the second and later registrations of a session skip Python start-up, the torch
import and the first-call warm-up).

It reads one JSON request per stdin line::

    {"id": "3", "fixed": "f.nrrd", "moving": "m.nrrd", "output": "out/",
     "options": {"device": "cpu", "affine": "none", "passes": 2, "refine": 0}}

``options`` are the flags of ``inversereg register`` without the dashes (``fixed_seg`` for
``--fixed-seg``; ``true`` for a flag without a value), and a request runs exactly as that command
does (the same parser, the same code). Every stdout line is one JSON event carrying the
request's id: ``progress`` (fraction, message), ``done`` (outdir, report) or ``error`` (one-line
message). ``{"event": "ready"}`` comes once, after the imports. The worker ends at end of input.
Cancelling a request means killing the worker (the caller starts a new one for the next request).
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
import threading
from typing import IO

from .errors import InverseRegError


class _Tagged(io.TextIOBase):
    """A stdout stand-in for one request: JSON lines get the request's id, anything else is
    passed on as a ``log`` event, so the caller's stream stays one JSON object per line."""

    def __init__(self, out: IO[str], request_id, lock: threading.Lock) -> None:
        self.out, self.request_id, self.lock, self.pending = out, request_id, lock, ""

    def write(self, text: str) -> int:
        self.pending += text
        while "\n" in self.pending:
            line, self.pending = self.pending.split("\n", 1)
            self._emit_line(line)
        return len(text)

    def _emit_line(self, line: str) -> None:
        if not line.strip():
            return
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            event = {"event": "log", "message": line}
        emit(self.out, self.lock, dict(event, id=self.request_id))

    def flush(self) -> None:
        if self.pending:
            self._emit_line(self.pending)
            self.pending = ""
        self.out.flush()


def emit(out: IO[str], lock: threading.Lock, event: dict) -> None:
    with lock:
        out.write(json.dumps(event) + "\n")
        out.flush()


def request_argv(request: dict) -> list:
    """A request -> the argument list of ``inversereg register`` (``--progress json`` forced)."""
    if not isinstance(request, dict):
        raise InverseRegError("a request must be a JSON object")
    missing = [key for key in ("fixed", "moving", "output") if not request.get(key)]
    if missing:
        raise InverseRegError(f"the request has no {', '.join(missing)}")
    options = request.get("options") or {}
    if not isinstance(options, dict):
        raise InverseRegError("'options' must be a JSON object")
    argv = ["register", str(request["fixed"]), str(request["moving"]), "-o", str(request["output"])]
    for key, value in options.items():
        if key in ("progress", "output", "o"):
            raise InverseRegError(f"option '{key}' is set by the worker")
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        else:
            argv += [flag, str(value)]
    return argv + ["--progress", "json"]


def _run(request: dict, parser) -> None:
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            args = parser.parse_args(request_argv(request))
    except SystemExit:  # argparse: an unknown option or a bad value
        lines = [line for line in errors.getvalue().splitlines() if line.strip()]
        raise InverseRegError(lines[-1].split("error: ", 1)[-1] if lines else "bad options") from None
    args.func(args)


def serve(stdin: IO[str] | None = None, stdout: IO[str] | None = None) -> int:
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    lock = threading.Lock()
    from . import pipeline  # noqa: F401  (torch and the network code, imported once for all requests)
    from .cli import build_parser
    parser = build_parser()
    emit(stdout, lock, {"event": "ready"})
    for line in stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
        except ValueError:
            emit(stdout, lock, {"event": "error", "id": None, "message": "the request is not JSON"})
            continue
        request_id = request.get("id") if isinstance(request, dict) else None
        tagged = _Tagged(stdout, request_id, lock)
        try:
            with contextlib.redirect_stdout(tagged):
                _run(request, parser)
        except InverseRegError as error:
            emit(stdout, lock, {"event": "error", "id": request_id,
                                "message": str(error).splitlines()[0] if str(error) else "error"})
        except Exception as error:  # one bad request must not end the worker
            emit(stdout, lock, {"event": "error", "id": request_id,
                                "message": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"})
        finally:
            tagged.flush()
    return 0
