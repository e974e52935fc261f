"""``python -m pipeline.honcho_run start ...``: honcho, as ``scripts/run`` starts it.

The same honcho (same arguments, same Procfile), minus two tracebacks a user
should never see: its output pipe gone (``scripts/run | head -3``: honcho
dies of ``BrokenPipeError``) and Ctrl-C arriving before honcho has set its
own handler. Either way the stack still stops: each process's respawn
wrapper sees its supervisor gone or its output unread (``pipeline.stacklock``).
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> int:
    from honcho.command import main as honcho_main

    try:
        honcho_main(sys.argv[1:])
    except BrokenPipeError:
        # Nobody reads us any more. Leave at once: a normal exit would join honcho's
        # multiprocessing children at exit, and a Ctrl-C meanwhile trips honcho's own
        # handler (KeyError 'pid'). The processes stop by themselves: their supervisor is gone.
        os._exit(0)
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
