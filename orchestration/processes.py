"""Process groups: how the demo and the tests know that everything a command started has ended."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

# How long a process group gets to finish its own shutdown before it is killed.
GROUP_STOP_SECONDS = 60.0


def group_alive(pgid: int) -> bool:
    """Whether any live (not zombie) process is in process group pgid. Zombies count as gone:
    an orphan reparented to a container's init may never be reaped, yet it runs nothing."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def finish_process_group(pgid: int, wait_seconds: float = GROUP_STOP_SECONDS) -> bool:
    """Wait for the group's processes to end by themselves (they were asked to stop), then kill
    what is left. Returns whether the group ended without being killed."""
    deadline = time.monotonic() + wait_seconds
    while group_alive(pgid):
        if time.monotonic() > deadline:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return False
        time.sleep(0.2)
    return True
