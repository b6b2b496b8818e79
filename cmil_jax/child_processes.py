"""Worker processes end with the process that started them, however it ends.

grain's data workers, the synthetic-data and data_prep build pools are separate processes. When
their parent is killed with SIGKILL (a scheduler's preemption after the grace period) nothing
tells them: they would keep their memory and CPU until the machine reboots, and with them
multiprocessing's resource tracker, which waits for every holder of its pipe. Each worker calls
``exit_with_parent()`` when it starts: a daemon thread that ends the worker as soon as it has
been handed to another parent (the parent is gone).
"""

import os
import threading
import time

POLL_SECONDS = 0.5


def _watch(parent: int, poll: float) -> None:
    while True:
        time.sleep(poll)
        if os.getppid() != parent:
            os._exit(0)  # no cleanup to run: the work belonged to the dead parent


def exit_with_parent(poll: float = POLL_SECONDS) -> None:
    """Ends this process within `poll` seconds of its parent's death (call once, in the child)."""
    parent = os.getppid()
    if parent <= 1:  # already orphaned
        os._exit(0)
    threading.Thread(target=_watch, args=(parent, poll), name="exit-with-parent",
                     daemon=True).start()
