"""Start an engine so that it dies with its node: `python -m inference.engines.launch CMD ARGS...`.

Sets the parent-death signal (Linux prctl PR_SET_PDEATHSIG: SIGTERM when the node process goes,
even if it was killed with SIGKILL), then replaces itself with the engine command. Done here and
not in the node through Popen's preexec_fn, which is unsafe in a process that has threads.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main() -> None:
    argv = sys.argv[1:]
    if not argv:
        sys.exit("usage: python -m inference.engines.launch CMD [ARGS...]")
    parent = int(os.environ.get("CBORG_NODE_PID") or 0)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass
    if parent and os.getppid() != parent:  # the node went away before prctl took effect
        sys.exit(1)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
