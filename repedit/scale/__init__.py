"""Scale-out: per-user pairs, fitting and evaluation sharded across Ray actors (``pip install 'repedit[ray]'``).

``with ray_session():`` starts a local Ray bound to loopback (or joins the cluster in ``RAY_ADDRESS``
/ the ``address`` given); :func:`pairs_on_ray`, :func:`fit_on_ray` and :func:`eval_on_ray` run the
jobs of ``repedit pairs`` / ``fit`` / ``eval`` with one model per actor and write the same resumable
outputs. :func:`read_users_dataset` reads large users files (Parquet or JSONL) with Ray Data.
Importing this package does not import Ray.
"""

from .data import read_users_dataset
from .jobs import eval_on_ray, fit_on_ray, pairs_on_ray
from .runtime import RaySession, WorkerPool, import_ray, ray_session

__all__ = ["RaySession", "WorkerPool", "eval_on_ray", "fit_on_ray", "import_ray", "pairs_on_ray", "ray_session", "read_users_dataset"]
