"""The teacher-logit cache: the teacher's top-k distribution at every trained position, computed once.

FOCUS / KD need, at each trained position of each SFT sequence, the teacher's distribution at the
training temperature tau. Instead of running the teacher in every training step, ``axolotl-focus
teacher-cache CONFIG --output DIR`` runs it once over the tokenized training data (exactly as
``axolotl train`` tokenizes it) and stores, per position, a :class:`axolotl_focus.train.losses.SparseTeacher`
row: the k ids of highest teacher probability, their ``log q`` and the log of the mass of all other
tokens. A training config then sets ``focus_teacher_cache: DIR`` (and loads no teacher): ``validate``
/ ``axolotl train`` check the folder's ``cache.json`` first (:mod:`.checks`), the
trainer opens it once, checks that every SFT row of its datasets is in it
(:func:`~axolotl_focus.train.teacher_cache.rows.dataset_sft_rows`,
:meth:`~axolotl_focus.train.teacher_cache.reader.TeacherCache.check_rows`), looks each batch row
up by its tokens (:meth:`~axolotl_focus.train.teacher_cache.reader.TeacherCache.sparse_for_batch`)
and feeds the fused loss the bucketed objective (see :mod:`axolotl_focus.train.losses.distill_sparse`).
The cache can be built from the config that names it (that key is ignored while building) or
from the same config without it.

Modules, one concept each:

    format      the format itself: sequence keys, trained positions, digests, ``cache.json``
                (:class:`~axolotl_focus.train.teacher_cache.format.CacheMeta`), shard names and columns
    shards      writing a cache shard by shard, atomically, and resuming or refusing a folder
    build       building from a teacher model (teacher forward -> sparse rows -> shards)
    kd_import   building from axolotl KD's offline top-k logprob datasets (no teacher model)
    reader      :class:`~axolotl_focus.train.teacher_cache.reader.TeacherCache`: a finished cache,
                memory-mapped, looked up by batch rows
    rows        the (input_ids, labels) rows of a tokenized dataset or of an axolotl config
    checks      the check of ``focus_teacher_cache`` before training (no shard is read)
    cli         the ``axolotl-focus teacher-cache`` command

The public API below is imported from its module on first use (:mod:`axolotl_focus.exports`).
"""

from ...exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "build": ("build_cache",),
    "checks": ("check",),
    "cli": ("TeacherCacheOptions", "add_teacher_cache_arguments", "folder_size", "run_teacher_cache_cli"),
    "format": ("DEFAULT_SHARD_SIZE", "FORMAT", "META_FILE", "VERSION", "CacheMeta", "data_sources", "read_meta",
               "sequence_key", "shard_problems", "tokenizer_digest", "trained_positions"),
    "kd_import": ("import_kd_rows", "run_import_cli"),
    "reader": ("TeacherCache",),
    "rows": ("dataset_sft_rows", "rows_from_config"),
    "shards": ("write_cache",),
})
