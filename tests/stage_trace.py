"""Run `python -m garden.stages` commands in one process and write, per command, which garden source
files had a function run while the stage worked: what a DVC stage's `deps` must cover. Module and class
bodies, and whatever runs while a module is being imported (decorators registering, constants
computed), only define: left out.

    python tests/stage_trace.py <out.json> <stage> [arguments] [-- <stage> [arguments] ...]
"""

from __future__ import annotations

import inspect
import json
import sys
import threading
from pathlib import Path


def _importing(frame) -> bool:
    caller = frame.f_back
    while caller is not None:
        if caller.f_code.co_name == "<module>" and caller.f_code.co_filename != __file__:
            return True
        caller = caller.f_back
    return False


def traced(argv: list[str]) -> list[str]:
    """The garden files a function of ran in while `python -m garden.stages <argv>` worked."""
    from garden.stages import main as stages_main

    ran: set[str] = set()

    def profile(frame, event, arg):
        code = frame.f_code
        if event != "call" or not code.co_flags & inspect.CO_OPTIMIZED or "garden" not in code.co_filename:
            return
        if code.co_filename not in ran and not _importing(frame):
            ran.add(code.co_filename)

    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        stages_main(argv)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    return sorted(ran)


def main() -> None:
    out, rest = Path(sys.argv[1]), sys.argv[2:]
    commands, current = [], []
    for arg in [*rest, "--"]:
        if arg == "--":
            commands.append(current)
            current = []
        else:
            current.append(arg)
    out.write_text(json.dumps({command[0]: traced(command) for command in commands if command}))


if __name__ == "__main__":
    main()
