"""Independent units of work, in this process or as Ray tasks (design.md decision 12).

A ``Runner`` maps a function over items and returns the results in the items' order, whoever computed them:
callers merge in that fixed order, so a run on N Ray workers computes what one process computes, bit for bit.
The units qcc hands out: calibration sample shards (compiler.calibration.collect), HTP runs of the device
check (compiler.htp.device_checks: generations x samples), judge candidates' scores, and whole compiles
(qcc compile-many).

- ``LocalRunner``: a plain loop in this process (no Ray needed; the default).
- ``RayRunner``: ``ray.init`` with N local workers (``--workers N``) or joins a cluster (``--ray-address``).
  What every task reads (a model, the sample list) goes to Ray's object store once (``shared``) and reaches
  the tasks by reference. A task whose worker dies is run again (``RETRIES`` times). Ctrl-C cancels every
  task not finished and shuts Ray down before the KeyboardInterrupt goes on, so the compile writes nothing.
  Progress is one bar for all workers.

Functions handed to ``map`` must be importable module-level functions (Ray pickles them by reference) and
take ``(shared, item)``; ``each(index, result)``, when given, sees every result as it arrives (in any order).
"""
from __future__ import annotations

import logging
import sys
import time

from compiler.errors import QccError
from compiler.progress import Progress

RAY_HINT = "--workers and --ray-address need Ray: pip install 'qcc[ray]'"
RETRIES = 3  # a task whose worker dies is run again this many times


class LocalRunner:
    workers = 1

    def map(self, function, items: list, shared=None, label: str | None = None, each=None) -> list:
        results = []
        with Progress(len(items), label or function.__name__) as bar:
            for index, item in enumerate(items):
                results.append(function(shared, item))
                bar.advance()
                if each is not None:
                    each(index, results[-1])
        return results

    def close(self) -> None:
        pass


class RayRunner:
    """Ray tasks on a local Ray of ``workers`` CPUs, or on the cluster at ``address``."""

    def __init__(self, workers: int | None = None, address: str | None = None):
        if workers is not None and workers < 1:
            raise QccError(f"--workers must be at least 1, got {workers}")
        try:
            import ray
        except ImportError:
            raise QccError(RAY_HINT) from None
        self.ray = ray
        ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.ERROR, configure_logging=False)
        self.workers = int(ray.cluster_resources().get("CPU", workers or 1))

    def map(self, function, items: list, shared=None, label: str | None = None, each=None) -> list:
        ray = self.ray
        task = ray.remote(max_retries=RETRIES)(function)
        shared_ref = ray.put(shared)
        refs = [task.remote(shared_ref, item) for item in items]
        index_of = {ref: index for index, ref in enumerate(refs)}
        try:
            with Progress(len(refs), label or function.__name__) as bar:
                pending = list(refs)
                while pending:
                    ready, pending = ray.wait(pending, num_returns=1)
                    bar.advance(len(ready))
                    if each is not None:
                        each(index_of[ready[0]], ray.get(ready[0]))
            return ray.get(refs)
        except KeyboardInterrupt:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)  # the task's own exception (a QccError stays one)
            raise (cause if isinstance(cause, Exception) else exc) from None

    def close(self) -> None:
        self.ray.shutdown()


def open_runner(workers: int | None, address: str | None):
    """A RayRunner when either is given, else a LocalRunner; the caller closes it."""
    if workers is None and address is None:
        return LocalRunner()
    start = time.perf_counter()
    runner = RayRunner(workers, address)
    where = f"{workers} local worker(s)" if address is None else f"the cluster at {address}, {runner.workers} CPUs"
    print(f"qcc: Ray started in {time.perf_counter() - start:.1f}s ({where})", file=sys.stderr)
    return runner
