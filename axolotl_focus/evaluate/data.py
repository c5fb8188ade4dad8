"""Prompts and reference texts of the two generation tasks (paper section 5.1), and the
perplexity text (:func:`ppl_source`; the rule is in :mod:`axolotl_focus.evaluate.ppl`).

Tasks (paper section 5.1)
-------------------------
* ``open_ended``: documents (default: the rows of the hub dataset ``Salesforce/wikitext``,
  ``wikitext-103-raw-v1``, ``test`` split, the paper's; with ``HF_HUB_OFFLINE`` /
  ``HF_DATASETS_OFFLINE`` set or when the hub load fails, the embedded WikiText-2 test slice,
  ``corpus_documents("test")``, with a log line; ``results.json`` ``data`` says which was used;
  ``embedded``: that slice, online or not; or a local text/JSONL file or hub dataset) with at
  least ``prefix_tokens + max_new_tokens`` model tokens; ``num_documents`` of them drawn with ``data_seed``
  (kept in corpus order).
  Prompt = the first ``prefix_tokens`` (50) tokens, re-encoded with BOS exactly as RePAIR mining
  does (:func:`~axolotl_focus.prompt_format.encode_prompt`); reference continuation = the next
  ``max_new_tokens`` (100) document tokens (the "human" row and MAUVE's p).
* ``instruction``: Self-Instruct style JSONL (``instruction`` + ``instances[{input, output}]``,
  one prompt per instance; or flat rows with ``instruction``/``prompt``, ``input`` and
  ``output``/``completion``/``response``) or a hub dataset; prompt = instruction + blank line +
  input, rendered with the chat template when the tokenizer has one; reference = the output
  (BERTScore). Default: the embedded 252 user-oriented Self-Instruct instructions (the hub
  copies of Self-Instruct need a loading script, which ``datasets`` 4 no longer runs).
"""

from __future__ import annotations

import logging
import os
import random
from importlib import resources
from typing import Any, Callable, Sequence

from .. import sources
from ..files import read_text
from ..generation import continuation_text
from ..micro import corpus_documents, corpus_text
from ..prompt_format import PromptFormat, encode_prompt
from ..sources import Prompt, load_prompts
from .config import EvalConfig

LOG = logging.getLogger(__name__)


DEFAULT_DATASET = ("Salesforce/wikitext", "wikitext-103-raw-v1", "test")  # the paper's open-ended / PPL data
EMBEDDED = "embedded:wikitext-2/test"
EMBEDDED_NAMES = ("embedded", EMBEDDED)  # --documents / --ppl-data value choosing the embedded slice

def default_wikitext() -> tuple[list[str] | None, dict]:
    """Rows (``text``) of the default dataset, WikiText-103 test from the hub, and where they came
    from. ``(None, info)`` when the embedded WikiText-2 test slice must stand in: an offline
    variable is set (logged), or the hub load fails (a warning naming the dataset and the error).
    ``info``: ``source`` (``hub:<name>/<config>/<split>`` or ``embedded:wikitext-2/test``),
    ``dataset``/``config``/``split`` and, after a fallback, ``fallback`` (why)."""
    name, config, split = DEFAULT_DATASET
    hub = {"source": f"hub:{name}/{config}/{split}", "dataset": name, "config": config, "split": split}
    embedded = _embedded()[1]
    var = sources.offline_env()
    if var:
        why = var if var.startswith("the hub") else f"{var} is set"
        LOG.info("%s: using the embedded WikiText-2 test slice instead of the hub dataset %s (%s, %s split) "
                 "for the default open-ended documents and perplexity text", why, name, config, split)
        return None, embedded | {"fallback": why}
    try:
        rows = list(sources.load_hub_dataset(name, config, split)["text"])
    except Exception as err:  # noqa: BLE001 - no network, a hub/httpx error, a missing cache, ...
        why = f"{type(err).__name__}: {str(err)[:200]}"
        LOG.warning("could not load the hub dataset %s (%s, %s split): %s. Falling back to the embedded WikiText-2 "
                    "test slice (numbers are not comparable to WikiText-103 ones); pass --documents / --ppl-data "
                    "to choose the data", name, config, split, why)
        return None, embedded | {"fallback": f"hub load failed ({why})"}
    return rows, hub


def _embedded() -> tuple[None, dict]:
    return None, {"source": EMBEDDED, "dataset": None, "config": None, "split": "test"}


def load_documents(cfg: EvalConfig, default: Callable[[], tuple[list[str] | None, dict]] = default_wikitext
               ) -> tuple[list[Prompt], dict]:
    """The open-ended documents and where they came from (see :func:`default_wikitext`)."""
    if cfg.documents in EMBEDDED_NAMES:
        default = _embedded
    elif cfg.documents is not None:
        docs = load_prompts(cfg.documents, text_field=cfg.text_field, input_field=None, split=cfg.documents_split,
                            dataset_config=cfg.documents_config, field="documents")
        return docs, {"source": cfg.documents, "config": cfg.documents_config, "split": cfg.documents_split}
    rows, info = default()
    if rows is not None:  # as load_prompts does for a hub dataset: id = row index, empty rows skipped
        return [Prompt(str(i), t) for i, t in enumerate(rows) if t.strip()], info
    return [Prompt(f"wikitext2-test-{i}", d) for i, d in enumerate(corpus_documents("test"))], info


def open_ended_items(tokenizer, documents: Sequence[Prompt], prefix_tokens: int = 50, max_new_tokens: int = 100,
                     num: int | None = 1000, seed: int = 0) -> list[dict]:
    """Prompts and reference continuations of the documents with ``prefix + max_new`` tokens.

    Rows: ``id``, ``prompt`` (text), ``prompt_tokens`` (prefix re-encoded with BOS),
    ``reference_tokens`` (the next ``max_new_tokens`` document tokens), ``reference``.
    """
    fmt = PromptFormat(mode="open_ended", prefix_tokens=prefix_tokens)
    eligible = []
    for doc in documents:
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        if len(ids) >= prefix_tokens + max_new_tokens:
            eligible.append((doc, ids))
    if num is not None and len(eligible) > num:
        keep = sorted(random.Random(seed).sample(range(len(eligible)), num))
        eligible = [eligible[i] for i in keep]
    items = []
    for doc, ids in eligible:
        text, prompt_ids = encode_prompt(tokenizer, doc.text, fmt)
        ref = ids[prefix_tokens : prefix_tokens + max_new_tokens]
        items.append({"id": doc.source_id, "prompt": text, "prompt_tokens": prompt_ids, "reference_tokens": ref,
                      "reference": continuation_text(tokenizer, ids[:prefix_tokens], ref)})
    return items


def embedded_instructions() -> str:
    """Path of the embedded 252 Self-Instruct user-oriented instructions (Apache-2.0, see its README)."""
    return str(resources.files("axolotl_focus").joinpath("data/self-instruct/user_oriented_instructions.jsonl"))


def _rows_of(source: str, config: str | None, split: str) -> list[tuple[Any, dict]]:
    if os.path.isfile(source):
        return [(default_id, row) for default_id, _, row in sources.read_json_rows(source, "instructions")]
    if sources.missing_file(source):
        raise FileNotFoundError(f"instructions: {source} not found")
    return list(enumerate(sources.load_hub_dataset(source, config, split)))


def load_instructions(source: str, *, config: str | None = None, split: str = "train",
                      limit: int | None = None) -> list[dict]:
    """Instruction prompts with reference outputs: ``[{"id", "text", "reference"}]``.

    Self-Instruct rows (``instruction``, ``instances: [{input, output}]``) give one prompt per
    instance (id ``<id>#<k>`` when there are several); flat rows use ``instruction``/``prompt``/
    ``text``, ``input`` and ``output``/``completion``/``response``. Text = instruction, plus a
    blank line and the input when non-empty.
    """
    out = []
    for default_id, row in _rows_of(source, config, split):
        instr = next((row[k] for k in ("instruction", "prompt", "text") if row.get(k)), None)
        if instr is None:
            raise ValueError(f"instructions: row {default_id} of {source} has no instruction/prompt/text field")
        instances = row.get("instances") or [
            {"input": row.get("input") or "",
             "output": next((row[k] for k in ("output", "completion", "response") if row.get(k)), "")}]
        base = row.get("id", default_id)
        for k, inst in enumerate(instances):
            inp = (inst.get("input") or "").strip()
            out.append({"id": f"{base}#{k}" if len(instances) > 1 else str(base),
                        "text": f"{instr}\n\n{inp}" if inp else instr, "reference": inst.get("output") or ""})
            if limit is not None and len(out) >= limit:
                return out
    return out


def instruction_items(tokenizer, rows: list[dict], chat_template: bool) -> list[dict]:
    fmt = PromptFormat(mode="instruction", chat_template=chat_template)
    items = []
    for row in rows:
        text, ids = encode_prompt(tokenizer, row["text"], fmt)
        items.append({"id": row["id"], "prompt": text, "prompt_tokens": ids, "reference": row["reference"]})
    return items


def ppl_source(cfg: EvalConfig, default: Callable[[], tuple[list[str] | None, dict]] = default_wikitext
                ) -> tuple[Callable[[], str], dict]:
    """The perplexity text's loader and where it comes from (``source``: the cache key and
    ``perplexity.data`` in the results)."""
    if cfg.ppl_data in EMBEDDED_NAMES:
        default = _embedded
    elif cfg.ppl_data is not None:
        return lambda: _ppl_text(cfg), {"source": cfg.ppl_data, "config": cfg.ppl_config, "split": cfg.ppl_split}
    rows, info = default()
    if rows is not None:  # joined as the explicit --ppl-data hub path does
        return lambda: "\n\n".join(rows), info
    return lambda: corpus_text("test"), info


def check_local_data(cfg: EvalConfig) -> None:
    """Read the local data files of ``cfg`` (documents, instructions, PPL text) once, so that a
    missing, non-UTF-8 or invalid file is one ``ValueError`` naming the option, file and line before
    any model is loaded or metric computed. Hub datasets and the embedded data are not touched."""
    for field, source in (("documents", cfg.documents), ("ppl_data", cfg.ppl_data),
                          ("instructions", cfg.instructions)):
        if source is None or source in EMBEDDED_NAMES:
            continue
        if sources.missing_file(source):
            raise ValueError(f"{field}: {source}: file not found")
        if not os.path.isfile(source):
            continue  # a hub dataset id
        if field == "instructions":
            load_instructions(source)
        elif field == "ppl_data" and not source.endswith((".jsonl", ".json")):
            read_text(source, field)
        else:
            load_prompts(source, text_field=cfg.text_field if field == "documents" else cfg.ppl_text_field,
                         input_field=None, field=field)


def _ppl_text(cfg: EvalConfig) -> str:
    """The text of an explicit ``--ppl-data`` (a text file, a JSON-lines file or a hub dataset)."""
    if os.path.isfile(cfg.ppl_data) and not cfg.ppl_data.endswith((".jsonl", ".json")):
        return read_text(cfg.ppl_data, "ppl_data")
    if os.path.isfile(cfg.ppl_data):
        return "\n\n".join(p.text for p in load_prompts(cfg.ppl_data, text_field=cfg.ppl_text_field, input_field=None,
                                                       field="ppl_data"))
    return "\n\n".join(sources.load_hub_dataset(cfg.ppl_data, cfg.ppl_config, cfg.ppl_split)[cfg.ppl_text_field])
