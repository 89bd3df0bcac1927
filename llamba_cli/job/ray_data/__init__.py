"""llamba jobs on Ray Data: the same jobs, across a cluster.

- `map_dataset(ds, job)`: a Ray user's `ray.data.Dataset` through llamba's engine,
  returning a dataset of result rows (the Python API).
- `run_ray_job(spec, RayOptions(...))`: what `llamba ... --ray` runs; writes a
  resumable folder of parts.

Needs the `ray` extra (`pip install 'llamba[ray]'`); nothing else in llamba imports
this package, so the base install works without Ray.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llamba_cli.job.ray_data.actor import EngineActor
    from llamba_cli.job.ray_data.api import job_spec, map_dataset
    from llamba_cli.job.ray_data.options import RayOptions
    from llamba_cli.job.ray_data.parts import PartFolder
    from llamba_cli.job.ray_data.runner import run_ray_job

__all__ = ["EngineActor", "PartFolder", "RayOptions", "job_spec", "map_dataset", "run_ray_job"]

# Loaded on first use: the CLI reads `RayOptions` to build its flags, and that must
# not import numpy, pyarrow or the engine (start-up time; tests/cli/test_startup.py).
_HOMES = {
    "EngineActor": "actor",
    "job_spec": "api",
    "map_dataset": "api",
    "RayOptions": "options",
    "PartFolder": "parts",
    "run_ray_job": "runner",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
