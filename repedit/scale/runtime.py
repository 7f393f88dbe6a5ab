"""Ray, started or joined: a local Ray bound to loopback, or a cluster by address, and a pool of model workers.

Ray is the distributed engine: it places the actors (one model each, ``num_gpus`` where GPUs are),
restarts an actor whose process dies and retries its task there (``max_restarts`` /
``max_task_retries``), and moves the inputs and results. repedit adds only what Ray cannot know:
which unit of work is done (the resumable outputs of :mod:`repedit.scale.jobs`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from ..io import InputError

# Ray 2.60 binds its servers (GCS, raylet, workers) to the node address, which it resolves to the
# machine's outward address even when given 127.0.0.1 — except when this flag is off, the setting
# Ray uses on laptops: then every listener is on 127.0.0.1 (measured with `ss -ltnp`).
LOOPBACK_FLAG = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
INSTALL_HINT = "Ray is not installed: pip install 'repedit[ray]' (ray[data])"


def import_ray():
    """``ray``, or an :class:`InputError` that says how to install it."""
    try:
        import ray
    except ImportError as err:
        raise InputError(INSTALL_HINT) from err
    return ray


@dataclass(frozen=True)
class RaySession:
    """The Ray this process is connected to: ``local`` (started here, stopped on exit) or a cluster."""

    address: str
    local: bool
    cpus: float
    gpus: float


def _loopback_only(ray) -> None:
    os.environ[LOOPBACK_FLAG] = "0"  # read by Ray at import and inherited by the processes it starts
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # ray was imported before the flag was set: it read the flag already
        constants.ENABLE_RAY_CLUSTER = False


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
                log_to_driver: bool = False) -> Iterator[RaySession]:
    """Connect to Ray for the duration of a ``with`` block.

    Args:
        address: ``None`` — the cluster in ``RAY_ADDRESS`` if set, else a local Ray; ``"local"`` — a
            new local Ray on this machine, listening on 127.0.0.1 only, shut down on exit (only the
            processes it started: other Ray instances on the machine are not touched); an address
            (``host:port``, ``ray://…``) or ``"auto"`` — a running cluster, only disconnected on exit.
            A cluster started with ``ray start --head`` uses token authentication by default: run
            with ``RAY_AUTH_MODE=token`` (and the cluster's token) to join it.
        num_cpus, num_gpus: resources of a local Ray (default: all of the machine's).
    If this process is already connected to Ray, that connection is used and left open.
    """
    if address is None:
        address = os.environ.get("RAY_ADDRESS") or "local"
    local = address == "local"
    if local:
        saved = os.environ.get(LOOPBACK_FLAG)
        _loopback_only(sys.modules.get("ray"))
    ray = import_ray()
    started = False
    try:
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": log_to_driver, "logging_level": "warning"}
            if local:
                kwargs.update(num_cpus=num_cpus, num_gpus=num_gpus)
            try:
                ray.init(address=address, **kwargs)
            except ConnectionError as err:
                raise InputError(f"cannot connect to the Ray cluster at {address!r}: {err} (a cluster with token authentication "
                                 "needs RAY_AUTH_MODE=token and its token)") from err
            started = True
        resources = ray.cluster_resources()
        gcs = ray.get_runtime_context().gcs_address
        if local and started and not gcs.startswith("127.0.0.1:"):
            raise InputError(f"the local Ray listens on {gcs}, not on loopback; stop it and retry")
        yield RaySession(gcs, local, float(resources.get("CPU", 0)), float(resources.get("GPU", 0)))
    finally:
        if started:
            ray.shutdown()  # a local Ray started by ray.init stops with it; a cluster is only disconnected
        if local:
            if saved is None:
                os.environ.pop(LOOPBACK_FLAG, None)
            else:
                os.environ[LOOPBACK_FLAG] = saved


class WorkerPool:
    """``actors`` Ray actors, each holding one copy of a model, fed units of work as they free up.

    A unit is ``(method, args)`` on :class:`repedit.scale.worker.ModelWorker`. An actor whose process
    dies is restarted by Ray (the model is loaded again) and its unit retried there, up to
    ``retries`` times; results come back in the order the units were given.
    """

    def __init__(self, model: str, actors: int, *, num_gpus: float = 0.0, cpus_per_actor: float | None = None,
                 dtype: str | None = None, retries: int = 3) -> None:
        ray = import_ray()
        from ray.util import ActorPool

        from .worker import remote_worker

        if actors < 1:
            raise InputError(f"actors must be at least 1, got {actors}")
        if cpus_per_actor is None:
            cpus_per_actor = max(1.0, float(ray.cluster_resources().get("CPU", 1)) // actors) if num_gpus == 0 else 1.0
        device = "cuda" if num_gpus > 0 else "cpu"
        options = {"num_cpus": cpus_per_actor, "num_gpus": num_gpus, "max_restarts": retries, "max_task_retries": retries}
        self.actors = [remote_worker().options(**options).remote(model, dtype=dtype, device=device, threads=max(1, int(cpus_per_actor)))
                       for _ in range(actors)]
        self._pool = ActorPool(self.actors)
        self.retries = retries
        self._ray = ray

    def map(self, method: str, units: Sequence[tuple]) -> Iterator[Any]:
        """Run ``method(*unit)`` for every unit on the actors; yield the results in the units' order.

        A unit that fails in the worker raises here: an :class:`InputError` as itself (its message names
        the problem), anything else as Ray's error with the worker's traceback.
        """
        results = self._pool.map(lambda actor, unit: getattr(actor, method).remote(*unit), list(units))
        for index in range(len(units)):
            try:
                yield next(results)
            except self._ray.exceptions.RayTaskError as err:
                if isinstance(err.cause, InputError):
                    raise InputError(str(err.cause)) from None
                raise
            except self._ray.exceptions.RayActorError as err:
                # Restarted `retries` times and still dying: usually memory (one model per actor) — say which unit.
                raise InputError(f"a Ray worker died {self.retries + 1} times running unit {index + 1} of {len(units)} ({method}); "
                                 f"the last cause: {str(err).splitlines()[0] if str(err) else type(err).__name__}. Fewer --actors "
                                 "(each holds a model) or smaller units may fit") from None

    def call(self, method: str, *args: Any) -> Any:
        """Run one ``method(*args)`` on the first actor and return its result."""
        return next(self.map(method, [args]))

    def pids(self) -> list[int]:
        """Process ids of the actors (e.g. to watch or stop one)."""
        return self._ray.get([actor.pid.remote() for actor in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
