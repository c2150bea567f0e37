"""Test support (tests/test_dvc.py): with this folder on PYTHONPATH and GARDEN_TRACE_DIR set, each
`python -m garden.stages <stage> ...` process of a stage GARDEN_TRACE_STAGES lists records which garden
source files had a function run while the stage worked, and writes them to
GARDEN_TRACE_DIR/<stage>-<pid>.json when it exits: what the stage's `deps` in dvc.yaml must cover.
Module and class bodies, and whatever runs while a module is imported (decorators registering, constants
computed), only define: they are left out. Other processes (DVC itself) are not traced.
"""

import atexit
import inspect
import json
import os
import sys
import threading
from pathlib import Path


def _importing(frame) -> bool:
    """Whether a module other than the program (`__main__`) is being executed above this call."""
    caller = frame.f_back
    while caller is not None:
        if caller.f_code.co_name == "<module>" and caller.f_globals.get("__name__") != "__main__":
            return True
        caller = caller.f_back
    return False


def _trace(folder: Path, stage: str) -> None:
    ran: set[str] = set()
    settled: set = set()  # code objects decided on: not garden's, or already recorded

    def tracer(frame, event, arg):
        """A global trace function: called at each Python call only (no C calls, and returning None
        asks for no line events), so the stage runs at nearly its own speed."""
        code = frame.f_code
        if code in settled:
            return None
        if not code.co_flags & inspect.CO_OPTIMIZED or "garden" not in code.co_filename:
            settled.add(code)
        elif not _importing(frame):  # a call while a module is imported is asked again later
            ran.add(code.co_filename)
            settled.add(code)
        return None

    def write() -> None:
        sys.settrace(None)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stage}-{os.getpid()}.json").write_text(json.dumps(sorted(ran)))

    atexit.register(write)
    threading.settrace(tracer)
    sys.settrace(tracer)


_argv = getattr(sys, "orig_argv", [])
_stages = os.environ.get("GARDEN_TRACE_STAGES", "").split(",")
if os.environ.get("GARDEN_TRACE_DIR") and _argv[1:3] == ["-m", "garden.stages"] and _argv[3:4] in (
    [s] for s in _stages
):
    _trace(Path(os.environ["GARDEN_TRACE_DIR"]), _argv[3])
