"""Stage 2 of the pipeline (prune -> mine -> train -> evaluate): RePAIR pair mining.

* :mod:`~axolotl_focus.mine.config`: :class:`MiningConfig` (the ``axolotl-focus pairs`` flags) and
  :class:`MiningSummary` (a run's counts);
* :mod:`~axolotl_focus.mine.run`: the procedure (student sample -> loop onset -> teacher
  regeneration), batches, processes and progress (:func:`run_mining`, :func:`mine_pairs`);
* :mod:`~axolotl_focus.mine.pairs_file`: the pairs JSONL (the rows the dataset type
  ``axolotl_focus.repair`` reads), its state, run record, shards and resume;
* :mod:`~axolotl_focus.mine.cli`: the ``axolotl-focus pairs`` command.

Shared with other stages: a prompt's text and ids as the student sees it
(:mod:`axolotl_focus.prompt_format`, also the evaluation's), the prompt sources
(:mod:`axolotl_focus.sources`), batched generation (:mod:`axolotl_focus.generation`), the loop
measures (:mod:`axolotl_focus.degeneration`) and the pair rows (:mod:`axolotl_focus.pair_rows`).

The public API below is imported from its module on first use (:mod:`axolotl_focus.exports`).
"""

from ..exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "cli": ("add_pairs_arguments", "run_pairs_cli"),
    "config": ("MiningConfig", "MiningSummary"),
    "run": ("mine_pairs", "run_mining"),
})
