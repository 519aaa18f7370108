"""`kit.sh trace`: every Python process started with this folder on PYTHONPATH writes the names of
the modules it has imported to $KIT_TRACE_DIR/<pid>.txt (every 2 s and at exit), so that processes
killed at shutdown (vLLM's engine core, the API server) are recorded too."""

import atexit
import os
import sys
import threading

_DIR = os.environ.get("KIT_TRACE_DIR")


def _dump() -> None:
    path = os.path.join(_DIR, f"{os.getpid()}.txt")
    try:
        with open(path + ".tmp", "w") as handle:
            handle.write(" ".join(sys.argv[:3]) + "\n" + "\n".join(sorted(list(sys.modules))))
        os.replace(path + ".tmp", path)
    except OSError:
        pass


def _every_two_seconds() -> None:
    import time

    while True:
        time.sleep(2)
        _dump()


if _DIR:
    threading.Thread(target=_every_two_seconds, daemon=True).start()
    atexit.register(_dump)
