"""The demo pipeline: :class:`Demo` runs (or reuses) the six stages into its output folder (see
:mod:`axolotl_focus.demo`); its frame is :class:`~.base.DemoBase` (settings, paths, stage cache, run
loop) and each stage is a mixin in its own module: :mod:`.model` (1, teacher), :mod:`.prune` (2),
:mod:`.table1` (3), :mod:`.pairs` (4), :mod:`.train` (5, ``axolotl train``), :mod:`.eval` (6)."""

from .base import DemoBase
from .eval import EvalStage
from .model import TeacherStage
from .pairs import PairsStage
from .prune import PruneStage
from .table1 import Table1Stage
from .train import TrainStage, merge_lora


class Demo(TeacherStage, PruneStage, Table1Stage, PairsStage, TrainStage, EvalStage, DemoBase):
    """Runs the stages into ``out`` (see :mod:`axolotl_focus.demo`)."""


__all__ = ["Demo", "DemoBase", "merge_lora"]
