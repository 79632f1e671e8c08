"""The one owner of the parallel layout: world = dp x tp x pp.

Degrees come from the DeepSpeed config: `tensor_parallel.autotp_size` (tp) and
`pipeline.stages` (pp); dp is what is left. Rank order follows DeepSpeed: tensor-parallel
groups are consecutive ranks, pipeline stages are the outermost axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from launcher.errors import LabsError


@dataclass(frozen=True)
class Layout:
    world: int
    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        for name, v in (("world size", self.world), ("tensor parallel size", self.tp),
                        ("pipeline stages", self.pp)):
            if v < 1:
                raise LabsError(f"{name} = {v}; it must be >= 1")
        if self.world % (self.tp * self.pp):
            raise LabsError(
                f"world size {self.world} is not divisible by tensor parallel size {self.tp} x "
                f"pipeline stages {self.pp} = {self.tp * self.pp}; change the hostfile slots or "
                f"the degrees so that world = dp x tp x pp"
            )

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    def dp_rank(self, rank: int) -> int:
        return (rank % (self.dp * self.tp)) // self.tp

    def describe(self) -> str:
        return f"world {self.world} = dp {self.dp} x tp {self.tp} x pp {self.pp}"

    @staticmethod
    def from_ds_config(cfg: dict[str, Any], world: int, path: str = "ds_config") -> Layout:
        tp = int(cfg.get("tensor_parallel", {}).get("autotp_size", 1) or 1)
        stages = cfg.get("pipeline", {}).get("stages", 1)
        if stages == "auto":
            stages = world // tp
        if not isinstance(stages, int) or stages < 1:
            raise LabsError(f"{path}: pipeline.stages = {stages!r}; it must be a positive integer")
        try:
            return Layout(world=world, tp=tp, pp=stages)
        except LabsError as e:
            raise LabsError(f"{path} (tensor_parallel.autotp_size = {tp}, pipeline.stages = {stages}): {e}") from None
