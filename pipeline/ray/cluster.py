"""The Ray cluster a run uses: join one or start a local one, keep Ray Data quiet, shut it down safely.

A local Ray gets a CPU slot per worker on top of the machine's cores (Ray Data's read and decode tasks
must not be starved by the workers' reservations) and no dashboard.
"""


from __future__ import annotations

import gc
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback

log = logging.getLogger(__name__)



def start_ray(address: str = "", workers: int = 0) -> str | None:
    """Joins the cluster at `address`, or starts a local Ray; None if Ray was running already (nothing to stop).

    A local Ray gets a CPU slot per worker on top of the machine's cores, so that Ray Data's read and
    decode tasks are not starved by the workers' reservations, a short temp dir of its own (its socket
    paths have a length limit) and no dashboard; `RAY_AUTH_MODE=disabled` keeps it from writing a token
    into the home directory. Returns the local temp dir ("" for a cluster) for `stop_ray`.
    """
    import ray

    if ray.is_initialized():
        return None
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        temp_dir = ""
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
        # Without a dashboard, Ray Train's placement-group cleaner logs a warning every few seconds that it
        # cannot query the state API: Ray's own processes log errors only.
        ray.init(num_cpus=(os.cpu_count() or 1) + workers, include_dashboard=False, _temp_dir=temp_dir,
                 logging_level=logging.WARNING, logging_config=ray.LoggingConfig(log_level="ERROR"))
    quiet_ray_data()
    return temp_dir


# Ray's own threads in a driver, and Ray Data's block prefetchers (parked on a condition until collected).
_RAY_SERVICE_THREADS = frozenset({"PythonGCThread", "ray_listen_error_messages", "ray_print_logs", "Prefetcher"})


def threads_running_ray() -> list[str]:
    """Names of this process's threads with Ray code on their stack, other than Ray's service threads."""
    frames = sys._current_frames()
    ray_dir = f"{os.sep}ray{os.sep}"
    others = {thread.ident: thread.name for thread in threading.enumerate() if thread is not threading.current_thread()
              and thread.name not in _RAY_SERVICE_THREADS and thread.ident in frames}
    return [name for ident, name in others.items() if ident is not None
            and any(ray_dir in entry.filename for entry in traceback.extract_stack(frames[ident]))]


def stop_ray(temp_dir: str | None, wait_seconds: float = 10.0) -> None:
    """Shuts down a Ray that `start_ray` started, once no thread of ours is still inside a Ray call.

    A thread that calls into Ray after `ray.shutdown()` makes Ray end the whole process with exit code 1
    (seen when a Ray Data reader was still winding down), so wait for such threads for up to `wait_seconds`.
    """
    import ray

    if temp_dir is None:
        return
    gc.collect()  # abandoned Ray Data iterators stop their threads when collected
    deadline = time.monotonic() + wait_seconds
    busy = threads_running_ray()
    while busy and time.monotonic() < deadline:
        time.sleep(0.05)
        busy = threads_running_ray()
    if busy:
        log.warning("shutting Ray down while threads still run Ray code: %s", ", ".join(busy))
    ray.shutdown()
    if temp_dir:
        shutil.rmtree(temp_dir, ignore_errors=True)


def quiet_ray_data() -> None:
    """No progress bars or per-execution INFO lines from Ray Data between the trainer's own lines."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.execution_options.preserve_order = True  # what our positions rely on; Train copies it per split
    logging.getLogger("ray.data").setLevel(logging.WARNING)



def cpus_per_worker(workers: int) -> int:
    """CPUs each worker reserves, and so its torch threads (Ray sets OMP_NUM_THREADS from it): the cluster's CPUs
    as they are now, shared among the workers after one per worker is left to Ray Data's read/decode tasks.
    On the local Ray `start_ray` makes (cores + workers CPUs) that is the machine's cores // workers."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 0) - workers) // workers)

