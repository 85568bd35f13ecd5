"""Worker processes shared by the stages: how a process ended, and the crash hook.

Tiling (:mod:`wsi_mil.workflows.batch`) and extraction (:mod:`wsi_mil.features.pool`)
both run slides in child processes and report a child that died by its signal.

Fault injection (tests only): when the environment variable :data:`CRASH_ENV` names a
slide id, the process working on that slide kills itself with SIGSEGV, as a native
reader crash would (:func:`crash_hook`).
"""

from __future__ import annotations

import os
import signal

__all__ = ["CRASH_ENV", "crash_hook", "interrupted_by", "signal_name"]

#: Environment variable naming a slide id whose worker crashes (fault-injection tests).
CRASH_ENV = "WSI_MIL_TEST_CRASH"


def signal_name(exitcode: int | None) -> str:
    """How a process ended, from its exit code: ``SIGSEGV`` (negative codes) or ``exit code N``."""
    if exitcode is None:
        return "an unknown status"
    if exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


def interrupted_by(signum: int | None) -> str:
    """``"interrupted by SIGTERM"`` for a stop request's signal number."""
    return f"interrupted by {signal_name(-(signum or 0))}"


def crash_hook(slide_id: str) -> None:
    """Fault injection for tests: die like a native crash when :data:`CRASH_ENV` names
    ``slide_id``."""
    if os.environ.get(CRASH_ENV) == slide_id:
        os.kill(os.getpid(), signal.SIGSEGV)
