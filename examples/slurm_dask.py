"""Run `wsi-mil run` with tiling and extraction on SLURM through dask-jobqueue.

Start it on the login node (or in a small job) from a folder that the compute nodes
see at the same path (a shared filesystem: slides, cohort, output folder):

    pip install dask-jobqueue
    python examples/slurm_dask.py slides/ cohort.csv --out /shared/study

It asks SLURM for CPU jobs (tiling) and GPU jobs (extraction); each GPU job runs one
Dask worker with `--resources GPU=1`, so every extraction task takes one GPU. Edit the
queue names, accounts and sizes for your cluster. Training runs in this process.
"""

from __future__ import annotations

import sys

from dask_jobqueue import SLURMCluster
from distributed import Client

from wsi_mil.workflows.cli import main

# Workers that may start decode processes (a nanny's worker is daemonic otherwise).
ENV = ["export DASK_DISTRIBUTED__WORKER__DAEMON=False"]


def gpu_cluster() -> SLURMCluster:
    """One Dask worker per GPU job: 1 GPU, 8 cores for decoding, advertised as GPU=1."""
    return SLURMCluster(
        queue="gpu",
        cores=8,
        processes=1,
        memory="64GB",
        walltime="08:00:00",
        job_extra_directives=["--gres=gpu:1"],
        worker_extra_args=["--resources", "GPU=1", "--nthreads", "1"],
        job_script_prologue=ENV,
    )


if __name__ == "__main__":
    with gpu_cluster() as cluster, Client(cluster):
        cluster.adapt(minimum=0, maximum=8)  # up to 8 GPU jobs while there is work
        status = main(["run", *sys.argv[1:], "--dask-scheduler", cluster.scheduler_address])
    sys.exit(status)
