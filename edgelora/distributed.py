"""Independent jobs (a LoRA to train, a task to adapt) as Ray tasks, when one machine is outgrown.

Ray is an optional extra of both sides (`pip install '.[ray]'`, `'./export[ray]'`): nothing imports
this module unless `--ray` is given, and the single machine stays the default. Jobs write where
every node reads (one machine, or a shared file system), so a task retried after its worker died
finds what the dead one left (a trainer's checkpoint) and nothing is copied through the driver.
"""
from __future__ import annotations

from typing import Callable, Iterator

from .errors import UserError

RETRIES = 3  # a task whose worker dies (killed, out of memory, a node lost) runs again up to this many times


def on_ray(address: str, fn: Callable, jobs: dict[str, tuple], cpus: int) -> Iterator[tuple[str, object]]:
    """`fn(*args)` for each job as a Ray task with `cpus` CPUs, yielded as (name, result) as they
    finish. `address`: a running cluster's ("auto", "IP:6379"), or "local" for one started here; a
    driver already connected keeps its cluster. A user's mistake raised in a task is raised here
    as the same one-line error."""
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs ray on every node: pip install 'edgelora[ray]' (and './export[ray]' to train)") from None
    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(num_cpus=cpus, max_retries=RETRIES)(fn)
    pending = {remote.remote(*args): name for name, args in jobs.items()}
    while pending:
        (ready,), _ = ray.wait(list(pending), num_returns=1)
        name = pending.pop(ready)
        try:
            result = ray.get(ready)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, UserError):
                raise e.cause from None
            raise
        yield name, result
