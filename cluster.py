"""Dask clusters shared by the per-slide stages: connecting, and what workers offer.

Tiling (:mod:`wsi_mil.workflows.batch`) and extraction (:mod:`wsi_mil.features.cluster`)
submit per-slide work to a Dask distributed scheduler (``--dask-scheduler``). An
unreachable scheduler fails in one line within :data:`DASK_CONNECT_TIMEOUT` seconds.
"""

from __future__ import annotations

from typing import Any

from wsi_mil.errors import SchedulerUnreachableError

__all__ = ["DASK_CONNECT_TIMEOUT", "connect", "worker_resources"]

#: Seconds to wait for a Dask scheduler to answer before giving up.
DASK_CONNECT_TIMEOUT = 5.0


def connect(scheduler: str, timeout: float = DASK_CONNECT_TIMEOUT) -> Any:
    """A :class:`distributed.Client` of ``scheduler``.

    Raises:
        SchedulerUnreachableError: No answer within ``timeout`` seconds (one line naming
            the address; the CLI exits with status 2).
    """
    import logging

    from distributed import Client

    quiet = logging.getLogger("distributed")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # the connection retries' log lines, not the cause
    try:
        return Client(scheduler, timeout=timeout)
    except (OSError, TimeoutError, ValueError) as exc:
        raise SchedulerUnreachableError(
            f"--dask-scheduler {scheduler}: no Dask scheduler answered within "
            f"{timeout:g} s ({type(exc).__name__}: {str(exc).strip()[:200]}); "
            "check the address and that the scheduler is running"
        ) from None
    finally:
        quiet.setLevel(level)


def worker_resources(client: Any) -> dict[str, dict[str, float]]:
    """``{worker address: {resource: amount}}`` of the workers connected now."""
    workers = client.scheduler_info(n_workers=-1).get("workers") or {}
    return {addr: dict(info.get("resources") or {}) for addr, info in workers.items()}
