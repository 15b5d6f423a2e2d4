"""A machine other than node 0 (`kvflow serve MODEL --headless --node-rank K ...`): it
starts its share of the ranks, which join node 0's rendezvous, and runs no API server.
It ends when they do: when node 0 stops, fails, or never answers."""
from __future__ import annotations

import logging
import signal
from types import FrameType

from kvflow.engine.args import EngineArgs
from kvflow.executor.base import ModelSpec
from kvflow.executor.multiproc import core_lists, rank_threads, start_worker, stop_workers
from kvflow.executor.worker import WorkerSpec

logger = logging.getLogger(__name__)


def run_headless(args: EngineArgs) -> int:
    """Returns the exit status: 0 if every rank ended cleanly, else 1."""
    parallel = args.parallel_config()
    if parallel.node_rank == 0:
        raise ValueError("--headless runs the ranks of a machine other than node 0: give "
                         "--node-rank 1 or more (node 0 runs the API server)")
    spec = ModelSpec.from_args(args)
    threads = args.num_threads or rank_threads(parallel) or 1
    cores = core_lists(parallel.ranks_per_node, threads)
    level = logging.getLogger("kvflow").getEffectiveLevel()
    processes = [start_worker(WorkerSpec(spec, parallel, rank, threads, cores[i], None, level))
                 for i, rank in enumerate(parallel.local_ranks)]
    logger.info("node %d of %d: ranks %d-%d (pids %s), joining %s:%d", parallel.node_rank,
                parallel.nnodes, parallel.local_ranks[0], parallel.local_ranks[-1],
                ", ".join(str(p.pid) for p in processes), parallel.master_addr,
                parallel.master_port)

    def stop(signum: int, frame: FrameType | None) -> None:
        stop_workers(processes)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    codes = [process.wait() for process in processes]
    logger.info("node %d's ranks exited with %s", parallel.node_rank, codes)
    return 0 if not any(codes) else 1
