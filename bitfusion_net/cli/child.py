"""Running the user's command: its environment, its signals, its exit status.

``run`` passes SIGINT, SIGTERM and SIGHUP on to the command, and exits with the command's exit
status (128 + N when a signal N ended it, as shells report it). A signal the terminal sent (Ctrl-C
reaches the whole foreground process group, the command included) is not passed on a second
time: like sudo, ``run`` waits for signals with ``sigwaitinfo`` and forwards only those sent by a
process (``si_code`` SI_USER or SI_QUEUE), not those from the kernel.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping, Sequence

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_WAITED = {*FORWARDED, signal.SIGCHLD}
SI_USER, SI_QUEUE = 0, -1  # <bits/siginfo-consts.h>: sent by kill() or sigqueue()
EXIT_NOT_FOUND, EXIT_NOT_EXECUTABLE = 127, 126  # as shells report them


def _unblock() -> None:  # in the child, before exec: it gets the signals as usual
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _WAITED)


def run_command(command: Sequence[str], env: Mapping[str, str]) -> int:
    """Run ``command`` to its end, forwarding signals; its exit status, shell-style. Raises
    ``FileNotFoundError``/``PermissionError`` when it cannot be started."""
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _WAITED)
    try:
        process = subprocess.Popen(list(command), env=dict(env), preexec_fn=_unblock)  # noqa: PLW1509 - the CLI has no other threads now
        while True:
            code = process.poll()
            if code is not None:
                return 128 - code if code < 0 else code
            info = signal.sigwaitinfo(_WAITED)
            if info.si_signo != signal.SIGCHLD and info.si_code in (SI_USER, SI_QUEUE):
                try:
                    process.send_signal(info.si_signo)
                except ProcessLookupError:
                    pass
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def describe(command: Sequence[str]) -> str:
    return " ".join(command)


def exit_status_for(error: OSError) -> int:
    return EXIT_NOT_FOUND if isinstance(error, FileNotFoundError) else EXIT_NOT_EXECUTABLE


def environment_with(extra: Mapping[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env
