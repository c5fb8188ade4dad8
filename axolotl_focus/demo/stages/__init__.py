"""The demo's stages, one module each, listed in :data:`TABLE` (see :mod:`axolotl_focus.demo.pipeline`):
each a function ``run(settings, ctx, folder, records) -> (data, summary)``, with the stages whose
records it reads."""

from ..pipeline import Stage
from . import eval, pairs, prune, sft, table1, teacher, train
from .train import merge_lora

TABLE = (
    Stage("teacher", "teacher model", (), teacher.run),
    Stage("prune", "width + depth pruning", ("teacher",), prune.run),
    Stage("table1", "Table 1: repetition before/after pruning", ("prune",), table1.run),
    Stage("sft", "the CE run of every training seed (`axolotl train`)", ("prune",), sft.run, resumable=True),
    Stage("pairs", "RePAIR pair mining from the model being repaired", ("prune", "sft"), pairs.run),
    Stage("train", "the other arms under every training seed (`axolotl train`)", ("sft", "pairs"), train.run,
          resumable=True),
    Stage("eval", "evaluation of every model, verdict inputs and diagnostics", ("train", "sft", "pairs", "table1"),
          eval.run, resumable=True),
)
STAGES = tuple(st.name for st in TABLE)

__all__ = ["STAGES", "TABLE", "merge_lora"]
