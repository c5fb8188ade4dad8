"""The SFT rows a teacher cache covers: ``(input_ids, labels)`` of a tokenized dataset or of an
axolotl config's datasets, RePAIR pair rows (:mod:`axolotl_focus.train.pair_dataset`) left out.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from ...config_file import read_config
from .format import as_int_array


def is_pair_row(attention_mask) -> bool:
    """A RePAIR pair row (segments marked 2 / 3 in the attention mask, see axolotl_focus.repair)."""
    if attention_mask is None:
        return False
    return bool((as_int_array(attention_mask) >= 2).any())


def _list_column(column) -> tuple[np.ndarray, np.ndarray]:
    """``(offsets [n + 1] starting at 0, values)`` of an Arrow list column (chunked or not)."""
    if hasattr(column, "combine_chunks"):
        column = column.combine_chunks()
    offsets = np.asarray(column.offsets, dtype=np.int64)
    values = column.flatten().to_numpy(zero_copy_only=False)
    return offsets - offsets[0], values


def dataset_sft_rows(dataset, batch_size: int = 8192) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """The ``(input_ids, labels)`` of the rows of a tokenized dataset, RePAIR pair rows (attention
    mask values 2 / 3, see :func:`is_pair_row`) skipped. A ``datasets.Dataset`` is read as Arrow
    columns, ``batch_size`` rows at a time (numpy slices, no Python lists); any other dataset
    (a ``torch`` map-style dataset, a list of rows) row by row."""
    import datasets  # heavy: only for a datasets.Dataset

    if isinstance(dataset, datasets.Dataset):
        columns = [c for c in ("input_ids", "labels", "attention_mask") if c in dataset.column_names]
        if "input_ids" not in columns or "labels" not in columns:
            raise ValueError(f"the tokenized dataset has no input_ids/labels columns (columns: {dataset.column_names})")
        arrow = dataset.select_columns(columns).with_format("arrow")
        for start in range(0, len(arrow), batch_size):
            table = arrow[start: start + batch_size]
            ids_at, ids = _list_column(table.column("input_ids"))
            labels_at, labels = _list_column(table.column("labels"))
            pair = np.zeros(len(ids_at) - 1, dtype=bool)
            if "attention_mask" in columns:
                mask_at, mask = _list_column(table.column("attention_mask"))
                marked = np.concatenate([[0], np.cumsum(mask >= 2)])
                pair = marked[mask_at[1:]] > marked[mask_at[:-1]]
            for row in np.flatnonzero(~pair):
                yield ids[ids_at[row]: ids_at[row + 1]], labels[labels_at[row]: labels_at[row + 1]]
        return
    for row in dataset:
        if not is_pair_row(row.get("attention_mask")):
            yield row["input_ids"], row["labels"]


def rows_from_config(config_path: str | os.PathLike, *, include_eval: bool = True,
                     extra_columns: Sequence[str] = (),
                     check_raw: Callable[[dict], None] | None = None) -> tuple[list, object]:
    """The (input_ids, labels) of the SFT rows of an axolotl config's tokenized datasets, as
    ``axolotl train`` loads them (``load_cfg`` with the plugin's register hook, then the datasets);
    RePAIR pair rows are skipped. A config with ``focus_teacher_cache`` (which may not exist yet)
    is loaded without that key, i.e. with the teacher it would load otherwise. The eval split
    follows the train rows when ``include_eval`` (the trainer computes the loss on it too). A row
    is ``(input_ids, labels, *extra_columns)``. ``check_raw``: called with the YAML mapping as read
    (a config that is missing, not UTF-8, not YAML or not a mapping is refused first) before anything
    else, e.g. to require dataset types.
    Returns ``(rows, cfg)``."""
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
    from axolotl.cli.config import load_cfg  # heavy: axolotl only when a config's data are read

    def refuse_packing(config) -> None:
        for key in ("sample_packing", "eval_sample_packing"):
            if config.get(key):
                raise ValueError(f"{config_path}: {key}: true is not supported by the teacher cache (a packed row "
                                 f"is not one cached sequence); set {key}: false")

    raw = read_config(str(config_path))[0]  # one line naming file:line: missing, not UTF-8, not YAML
    if check_raw is not None:
        check_raw(raw if isinstance(raw, dict) else {})
    overrides = {}
    if isinstance(raw, dict):
        refuse_packing(raw)  # before axolotl validates the config and prepares anything
        if raw.get("focus_teacher_cache"):  # the cache this config trains from: load it as the config without
            overrides["focus_teacher_cache"] = None  # it (same data, teacher as the plugin resolves it)
    cfg = load_cfg(str(config_path), **overrides)
    refuse_packing(cfg)
    if cfg.get("rl"):
        raise ValueError(f"{config_path}: rl: {cfg.rl} trains without the FOCUS/KD teacher; no teacher cache needed")
    dataset_meta = None
    if cfg.get("plugins"):
        from axolotl.integrations.base import PluginManager  # heavy: axolotl only when a config's data are read

        dataset_meta = PluginManager.get_instance().load_datasets(cfg, preprocess=False)
    if dataset_meta is None:
        from axolotl.common.datasets import load_datasets  # heavy: axolotl only when a config's data are read

        dataset_meta = load_datasets(cfg=cfg)
    rows = []
    splits = [dataset_meta.train_dataset] + ([dataset_meta.eval_dataset] if include_eval else [])
    for dataset in splits:
        if dataset is None:
            continue
        wanted = ("input_ids", "labels", *extra_columns)
        missing = [c for c in wanted if c not in dataset.column_names]
        if missing:
            raise ValueError(f"{config_path}: the tokenized dataset has no {'/'.join(missing)} column(s) "
                             f"(columns: {dataset.column_names})")
        columns = [*wanted] + (["attention_mask"] if "attention_mask" in dataset.column_names else [])
        for batch in dataset.select_columns(columns).with_format(None).iter(batch_size=1024):
            masks = batch.get("attention_mask") or [None] * len(batch["input_ids"])
            for values in zip(*(batch[c] for c in wanted), masks):
                if not is_pair_row(values[-1]):
                    rows.append(values[:-1])
    return rows, cfg


