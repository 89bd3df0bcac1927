"""Where and how wide a job runs on Ray: `RayOptions` (no Ray import here)."""

from __future__ import annotations

from dataclasses import dataclass

from llamba_cli.errors import ConfigError


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a job runs on Ray.

    `address`: None starts a local Ray instance (or joins $RAY_ADDRESS), "auto" joins
    the cluster this machine belongs to, "ray://host:10001" a remote one.  `actors`
    engines run at once, each with `threads_per_actor` CPUs (also its llama.cpp
    threads).  `block_rows` rows make one block: one actor call and one output part.
    """

    address: str | None = None
    actors: int | None = None
    threads_per_actor: int | None = None
    block_rows: int | None = None

    def __post_init__(self) -> None:
        for name in ("actors", "threads_per_actor", "block_rows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} must be >= 1, got {value}")
