"""The one owner of the parallel layout: world = dp x sp x tp x pp.

Degrees come from the DeepSpeed config: `tensor_parallel.autotp_size` (tp), `pipeline.stages` (pp)
and `sequence_parallel_size` (sp, DeepSpeed-Ulysses); dp is what is left. Rank order, innermost
first: tensor-parallel ranks are consecutive, then sequence-parallel, then data-parallel replicas,
and pipeline stages are the outermost axis (DeepSpeed's PipeModelDataParallelTopology: pipe, data,
model; its Ulysses mesh: data, sequence):

    rank = ((pp_rank * dp + dp_rank) * sp + sp_rank) * tp + tp_rank

Sequence parallelism combines with data parallelism only (tp = pp = 1): the model is whole on every
rank and only the sequence is split (launcher/parallel/sequence_parallel.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from launcher.common.errors import LabsError


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def valid_layouts(world: int, heads: int | None = None, layers: int | None = None) -> list[str]:
    """Every layout labs can run on `world` ranks (for a model with `heads` attention heads and `layers`
    blocks when known), as "dp D x tp T x pp P" (x sp S when S > 1)."""
    out = []
    for pp in _divisors(world):
        for tp in _divisors(world // pp):
            for sp in _divisors(world // (pp * tp)):
                if sp > 1 and (tp > 1 or pp > 1):
                    continue
                if heads and (heads % tp or heads % sp):
                    continue
                if layers and pp > layers:
                    continue
                out.append(Layout(world, tp=tp, pp=pp, sp=sp).short())
    return out


@dataclass(frozen=True)
class Layout:
    world: int
    tp: int = 1
    pp: int = 1
    sp: int = 1

    def __post_init__(self) -> None:
        for name, v in (("world size", self.world), ("tensor parallel size", self.tp),
                        ("pipeline stages", self.pp), ("sequence parallel size", self.sp)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise LabsError(f"{name} = {v!r}; it must be an integer >= 1")
        model = self.tp * self.pp * self.sp
        if self.world % model:
            raise LabsError(
                f"world size {self.world} is not divisible by tensor parallel size {self.tp} x "
                f"pipeline stages {self.pp} x sequence parallel size {self.sp} = {model}; change the "
                f"hostfile slots or the degrees so that world = dp x sp x tp x pp. Valid layouts for "
                f"{self.world} rank(s): {'; '.join(valid_layouts(self.world))}")
        if self.sp > 1 and (self.tp > 1 or self.pp > 1):
            raise LabsError(
                f"sequence parallel size {self.sp} with tensor parallel size {self.tp} and pipeline stages "
                f"{self.pp}: sequence parallelism (Ulysses) combines with data parallelism only here; valid "
                f"layouts for {self.world} rank(s): {'; '.join(valid_layouts(self.world))}")

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp * self.sp)

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's index on each axis."""
        return {"pp": rank // (self.dp * self.sp * self.tp), "dp": self.dp_rank(rank),
                "sp": self.sp_rank(rank), "tp": rank % self.tp}

    def dp_rank(self, rank: int) -> int:
        return (rank % (self.dp * self.sp * self.tp)) // (self.sp * self.tp)

    def sp_rank(self, rank: int) -> int:
        return (rank // self.tp) % self.sp

    def short(self) -> str:
        return f"dp {self.dp} x tp {self.tp} x pp {self.pp}" + (f" x sp {self.sp}" if self.sp > 1 else "")

    def describe(self) -> str:
        return f"world {self.world} = {self.short()}"

    @staticmethod
    def from_ds_config(cfg: dict[str, Any], world: int, path: str = "ds_config") -> Layout:
        """The layout a DeepSpeed config asks for on `world` ranks; every section it reads is type- and
        range-checked first (a malformed section is a LabsError naming the field, never a traceback)."""
        tp_sec = _section(cfg, "tensor_parallel", path, '{"autotp_size": 2}')
        pipe = _section(cfg, "pipeline", path, '{"stages": 2}')
        tp = tp_sec.get("autotp_size", 1)
        tp = _positive(1 if tp == 0 else tp, f"{path}: tensor_parallel.autotp_size",  # 0: DeepSpeed's "off"
                       "the ranks each matrix is split across; 0 or 1: off", none_is=1)
        sp = _positive(cfg.get("sequence_parallel_size", 1), f"{path}: sequence_parallel_size",
                       "the ranks one sequence is split across", none_is=1)
        stages = pipe.get("stages", 1)
        if stages == "auto":
            stages = world // (tp * sp)
        stages = _positive(stages, f"{path}: pipeline.stages", "the pipeline's stages, or \"auto\"")
        try:
            return Layout(world=world, tp=tp, pp=stages, sp=sp)
        except LabsError as e:
            what = f"tensor_parallel.autotp_size = {tp}, pipeline.stages = {stages}"
            what += f", sequence_parallel_size = {sp}" if sp > 1 else ""
            raise LabsError(f"{path} ({what}): {e}") from None


def _section(cfg: dict[str, Any], key: str, path: str, example: str) -> dict[str, Any]:
    sec = cfg.get(key)
    if sec is None:
        return {}
    if not isinstance(sec, dict):
        raise LabsError(f"{path}: {key} = {sec!r}; it must be an object like {example} (or left out)")
    return sec


def _positive(value: Any, where: str, what: str, none_is: int | None = None) -> int:
    if value is None and none_is is not None:
        return none_is
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise LabsError(f"{where} = {value!r}; it must be a positive integer ({what})")
    return value
