"""Orchestration: the ``wsi-mil`` CLI, per-slide batch execution (local pool or Dask)
and the end-to-end demo. Nothing below ``workflows`` imports from here."""

from wsi_mil.workflows.batch import Job, run_batch

__all__ = ["Job", "run_batch"]
