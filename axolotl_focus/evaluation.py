"""`axolotl-focus eval`: the paper's evaluation (Tables 3/4, section 6) for any number of models.

Tasks (paper section 5.1)
-------------------------
* ``open_ended``: documents (default: the rows of the hub dataset ``Salesforce/wikitext``,
  ``wikitext-103-raw-v1``, ``test`` split, the paper's; with ``HF_HUB_OFFLINE`` /
  ``HF_DATASETS_OFFLINE`` set or when the hub load fails, the embedded WikiText-2 test slice,
  ``corpus_documents("test")``, with a log line; ``results.json`` ``data`` says which was used;
  ``embedded``: that slice, online or not; or a local text/JSONL file or hub dataset) with at
  least ``prefix_tokens + max_new_tokens`` model tokens; ``num_documents`` of them drawn with ``data_seed`` (kept in corpus order).
  Prompt = the first ``prefix_tokens`` (50) tokens, re-encoded with BOS exactly as RePAIR mining
  does (:func:`~axolotl_focus.mining.encode_prompt`); reference continuation = the next
  ``max_new_tokens`` (100) document tokens (the "human" row and MAUVE's p).
* ``instruction``: Self-Instruct style JSONL (``instruction`` + ``instances[{input, output}]``,
  one prompt per instance; or flat rows with ``instruction``/``prompt``, ``input`` and
  ``output``/``completion``/``response``) or a hub dataset; prompt = instruction + blank line +
  input, rendered with the chat template when the tokenizer has one; reference = the output
  (BERTScore). Default: the embedded 252 user-oriented Self-Instruct instructions (the hub
  copies of Self-Instruct need a loading script, which ``datasets`` 4 no longer runs).

Decodings: top-p (0.9, pure nucleus, ``top_k=0``) under each seed of ``seeds``, and greedy.
Generation is batched with the KV cache through :func:`~axolotl_focus.mining.generate_batch`
(batch ``b`` = prompts ``b * batch_size ...``; under seed ``s`` row ``i`` of batch ``b`` samples from
its own generator seeded by ``row_seed(s * 100003 + b, i)``); a row ends at EOS (excluded) or at its
budget and then leaves the batch (the decoding loop drops ended rows). Under ``torchrun`` / ``accelerate launch`` with N
processes the batches are shared out (``PartialState().split_between_processes``), each rank
generating on its own device, and gathered back in order on rank 0: batches and seeds depend
only on the prompt order, so the generations equal a one-process run's on the same kind of
device. Rank 0 alone loads data, computes the other metrics and writes every file.

Files (``output_dir``)
----------------------
``<model>/generations/<task>.<decoding>.jsonl`` (decoding ``top_p0.9.seed<s>`` or ``greedy``)
and its ``.meta.json`` (the settings the file was made with; written last, so a file without its
meta is never reused): one row per prompt with ``id``,
``prompt``, ``prompt_tokens``, ``tokens`` (generated ids, EOS excluded), ``text``, ``stop``
(``eos``/``budget``), ``reference`` (and ``reference_tokens`` for open-ended). Model-dependent
numbers are cached the same way (``perplexity.json``, ``zero_shot.json``, ``distribution.json``,
``_teacher/distribution_samples.*``). A rerun reuses every file whose meta matches and loads a
model only when something is missing; ``metrics_only`` never generates nor loads a model (missing
pieces are reported as unavailable); ``regenerate`` ignores the caches. Then per model
``results.json``; across models ``results.md`` and ``plots/*.png``.

Metrics
-------
* CREP (threshold 0.3, r 4..16), rep-n n = 3..6 (per continuation ``1 - unique/total`` on model
  tokens, averaged, x100), EAD-1 with ``V = len(tokenizer)`` (corpus level), degeneration in
  serving: all from :mod:`axolotl_focus.degeneration` on the saved token ids.
* Perplexity: one token stream (BOS + the test text, no other specials; default text: the
  open-ended default dataset's rows joined with blank lines); windows of ``window``
  tokens start every ``stride`` tokens; each window scores only the tokens not scored before
  (with the window's earlier tokens as context); the first token of the stream and, when
  ``stride == window``, the first token of every window are not scored. ``stride == window`` is
  plain chunked NLL. PPL = exp(total NLL / scored tokens).
* MAUVE (``mauve-text``): features = the final-layer hidden state of the last token (MAUVE's own
  featurization) from a local or cached HF model (``mauve_featurizer``, default gpt2-large),
  texts truncated to ``mauve_max_text_length`` featurizer tokens; p = reference continuations,
  q = generations; ``compute_mauve(p_features=, q_features=, seed=s)`` averaged over
  ``mauve_seeds``, then over generation seeds.
* BERTScore F1 (``bert-score``; default roberta-large, layer 17), rescaled with bert-score's
  baseline when ``bertscore_rescale`` and a baseline exists for the model (results say which).
* Zero-shot (``lm-eval``): ``simple_evaluate(HFLM(pretrained=path), tasks, num_fewshot=0)``;
  acc_norm for arc_challenge / hellaswag / openbookqa, acc otherwise (the paper does not say which;
  this is LLM-Pruner's convention; both are saved); average over the six tasks, TruthfulQA-MC2
  apart.
* Distribution study (section 6): the teacher samples ``distribution_samples`` continuations of
  open-ended prompts (top-p, first seed); teacher q and student p at every generated position
  (temperature 1). H = top-p set (``head_top_p`` 0.9; the smallest set of most probable tokens
  with mass >= 0.9), T = the rest. ``ar_head = |H_q & H_p| / |H_q|``, ``ar_tail = |T_q & T_p| /
  |T_q|``, ``cor_head`` / ``cor_tail`` = Pearson correlation of q and p over the tokens of H_q /
  T_q, ``count_head`` = mean |H_p| (the student's candidates; ``count_head_teacher`` = mean
  |H_q|). Means over positions (correlations over positions where defined).

A metric whose package, model or data is missing is reported under ``unavailable`` with what to
install or pass; the other metrics still run.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import math
import os
import platform
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .config import TRAINING_RECORD
from .degeneration import DEFAULT_THRESHOLD, repetition_metrics, serving_degeneration
from .losses import focus_weights
from .locations import looks_local
from .mining import MiningConfig, Prompt, _continuation_text, encode_prompt, generate_batch, load_prompts

LOG = logging.getLogger(__name__)

__all__ = [
    "EvalConfig", "MetricUnavailable", "evaluate_models", "evaluate_model", "open_ended_items",
    "load_instructions", "perplexity", "top_p_mask", "distribution_stats", "distribution_study",
    "mauve_score", "bertscore_f1", "zero_shot", "reweighted", "toy_zipf", "markdown_report",
    "make_plots", "focus_params_of", "add_eval_arguments", "run_eval_cli", "default_wikitext",
]

EXTRA = "pip install 'axolotl-focus[eval]'"
TASKS = ("open_ended", "instruction")
METRICS = ("ppl", "repetition", "serving", "mauve", "bertscore", "zero_shot", "distribution")
DECODINGS = ("top_p", "greedy")
ZERO_SHOT_AVERAGE = ("arc_challenge", "piqa", "boolq", "openbookqa", "hellaswag", "winogrande")
ZERO_SHOT_TASKS = ZERO_SHOT_AVERAGE + ("truthfulqa_mc2",)
ZERO_SHOT_METRIC = {"arc_challenge": "acc_norm", "hellaswag": "acc_norm", "openbookqa": "acc_norm"}
REP_NS = (3, 4, 5, 6)


class MetricUnavailable(RuntimeError):
    """A metric cannot run here (missing extra, model or data); the message says what to do."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    """Settings of an evaluation run (defaults: the paper's where it states them)."""

    output_dir: str = "eval_results"
    tasks: tuple[str, ...] = TASKS
    metrics: tuple[str, ...] = METRICS
    decodings: tuple[str, ...] = DECODINGS
    seeds: tuple[int, ...] = (0,)  # top-p generation seeds
    top_p: float = 0.9
    temperature: float = 1.0
    batch_size: int = 16
    threshold: float = DEFAULT_THRESHOLD  # CREP coverage threshold
    # open-ended generation
    documents: str | None = None  # None: WikiText-103 test from the hub (offline: embedded WikiText-2 test)
    documents_config: str | None = None
    documents_split: str = "test"
    text_field: str | None = None
    num_documents: int = 1000
    data_seed: int = 0
    prefix_tokens: int = 50
    max_new_tokens: int = 100  # paper Table 3: 100 (Table 1: 200)
    # instruction-based generation
    instructions: str | None = None  # local JSONL (Self-Instruct style) or hub id; None: embedded 252
    instructions_config: str | None = None
    instructions_split: str = "train"
    num_instructions: int = 1000
    instruction_max_new_tokens: int = 256
    chat_template: bool = True
    # perplexity
    ppl_data: str | None = None  # None: as documents (WikiText-103 test; offline: embedded WikiText-2 test)
    ppl_config: str | None = None
    ppl_split: str = "test"
    ppl_text_field: str = "text"
    ppl_window: int = 1024  # capped by the model's max_position_embeddings
    ppl_stride: int = 512
    ppl_max_tokens: int | None = None
    # MAUVE
    mauve_featurizer: str = "gpt2-large"
    mauve_seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    mauve_max_text_length: int = 1024
    mauve_scaling_factor: float = 5.0
    # BERTScore
    bertscore_model: str = "roberta-large"
    bertscore_layer: int | None = None  # None: bert-score's table (roberta-large: 17)
    bertscore_rescale: bool = True
    bertscore_baseline: str | None = None  # baseline .tsv; default: bert-score's for the model name
    # zero-shot
    zero_shot_tasks: tuple[str, ...] = ZERO_SHOT_TASKS
    zero_shot_batch_size: str = "auto"
    zero_shot_limit: float | None = None
    zero_shot_include: str | None = None  # folder of extra lm-eval task YAMLs (local datasets)
    # distribution study
    teacher: str | None = None  # default: the first model's recorded focus_source_model
    distribution_samples: int = 200
    head_top_p: float = 0.9
    # plots
    plots: bool = True
    focus_params: dict[str, tuple[float, float]] = field(default_factory=dict)  # model -> (beta, gamma)
    focus_toy: tuple[tuple[float, float], ...] = ((5.0, 1.0), (15.0, 1.0), (15.0, 3.0))
    # run control
    metrics_only: bool = False
    regenerate: bool = False
    device: str | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False
    progress: bool = True

    def validate(self) -> "EvalConfig":
        """Raise one ``ValueError`` naming every bad field."""
        errors = []

        def bad(name, msg):
            errors.append(f"{name}: {msg} (got {getattr(self, name)!r})")

        for name, allowed in (("tasks", TASKS), ("metrics", METRICS), ("decodings", DECODINGS)):
            if not set(getattr(self, name)) <= set(allowed):
                bad(name, f"must be a subset of {allowed}")
        for name in ("batch_size", "num_documents", "prefix_tokens", "max_new_tokens", "num_instructions",
                     "instruction_max_new_tokens", "ppl_window", "ppl_stride", "distribution_samples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                bad(name, "must be an integer > 0")
        if isinstance(self.ppl_stride, int) and isinstance(self.ppl_window, int) and self.ppl_stride > self.ppl_window:
            bad("ppl_stride", f"must be <= ppl_window ({self.ppl_window}) so that every token is scored")
        for name in ("top_p", "head_top_p"):
            if not 0 < getattr(self, name) <= 1:
                bad(name, "must be in (0, 1]")
        if not 0 < self.threshold < 1:
            bad("threshold", "must be in (0, 1)")
        if "top_p" in self.decodings and not self.seeds:
            bad("seeds", "top-p decoding needs at least one seed")
        if self.metrics_only and self.regenerate:
            bad("regenerate", "contradicts metrics_only")
        if errors:
            raise ValueError("; ".join(errors))
        return self


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("axolotl-focus", "torch", "transformers", "datasets", "tokenizers", "numpy", "mauve-text",
                "bert-score", "lm-eval", "faiss-cpu", "scikit-learn", "matplotlib"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _require(module: str, package: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MetricUnavailable(f"{what} needs the `{package}` package ({err}): {EXTRA}") from None


def _jsonable(value):
    return json.loads(json.dumps(value))


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _cached(path: Path, meta: dict, compute: Callable[[], Any], cfg: EvalConfig, what: str):
    """``compute()`` unless ``path`` holds a value made with the same ``meta``."""
    meta = _jsonable(meta)
    old = None if cfg.regenerate else _read_json(path)
    if old is not None and old.get("meta") == meta:
        return old["value"]
    if cfg.metrics_only:
        raise MetricUnavailable(f"{what}: not computed yet and --metrics-only forbids loading the model")
    value = _jsonable(compute())
    _write_json(path, {"meta": meta, "value": value})
    return value


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


DEFAULT_DATASET = ("Salesforce/wikitext", "wikitext-103-raw-v1", "test")  # the paper's open-ended / PPL data
EMBEDDED = "embedded:wikitext-2/test"
EMBEDDED_NAMES = ("embedded", EMBEDDED)  # --documents / --ppl-data value choosing the embedded slice
_TRUE = ("1", "ON", "YES", "TRUE")


def _offline_env() -> str | None:
    """The name of the set ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` variable, if any."""
    return next((v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
                 if os.environ.get(v, "").strip().upper() in _TRUE), None)


def _load_hub_dataset(name: str, config: str | None, split: str):
    """``datasets.load_dataset(name, config, split=split)`` (one place, so tests can replace it)."""
    import datasets

    return datasets.load_dataset(name, config, split=split)


def default_wikitext() -> tuple[list[str] | None, dict]:
    """Rows (``text``) of the default dataset, WikiText-103 test from the hub, and where they came
    from. ``(None, info)`` when the embedded WikiText-2 test slice must stand in: an offline
    variable is set (logged), or the hub load fails (a warning naming the dataset and the error).
    ``info``: ``source`` (``hub:<name>/<config>/<split>`` or ``embedded:wikitext-2/test``),
    ``dataset``/``config``/``split`` and, after a fallback, ``fallback`` (why)."""
    name, config, split = DEFAULT_DATASET
    hub = {"source": f"hub:{name}/{config}/{split}", "dataset": name, "config": config, "split": split}
    embedded = _embedded()[1]
    var = _offline_env()
    if var:
        LOG.info("%s is set: using the embedded WikiText-2 test slice instead of the hub dataset %s (%s, %s split) "
                 "for the default open-ended documents and perplexity text", var, name, config, split)
        return None, embedded | {"fallback": f"{var} is set"}
    try:
        rows = list(_load_hub_dataset(name, config, split)["text"])
    except Exception as err:  # noqa: BLE001 - no network, a hub/httpx error, a missing cache, ...
        why = f"{type(err).__name__}: {str(err)[:200]}"
        LOG.warning("could not load the hub dataset %s (%s, %s split): %s. Falling back to the embedded WikiText-2 "
                    "test slice (numbers are not comparable to WikiText-103 ones); pass --documents / --ppl-data "
                    "to choose the data", name, config, split, why)
        return None, embedded | {"fallback": f"hub load failed ({why})"}
    return rows, hub


def _embedded() -> tuple[None, dict]:
    return None, {"source": EMBEDDED, "dataset": None, "config": None, "split": "test"}


def _documents(cfg: EvalConfig, default: Callable[[], tuple[list[str] | None, dict]] = default_wikitext
               ) -> tuple[list[Prompt], dict]:
    """The open-ended documents and where they came from (see :func:`default_wikitext`)."""
    if cfg.documents in EMBEDDED_NAMES:
        default = _embedded
    elif cfg.documents is not None:
        docs = load_prompts(cfg.documents, text_field=cfg.text_field, input_field=None, split=cfg.documents_split,
                            dataset_config=cfg.documents_config)
        return docs, {"source": cfg.documents, "config": cfg.documents_config, "split": cfg.documents_split}
    rows, info = default()
    if rows is not None:  # as load_prompts does for a hub dataset: id = row index, empty rows skipped
        return [Prompt(str(i), t) for i, t in enumerate(rows) if t.strip()], info
    from .micro import corpus_documents

    return [Prompt(f"wikitext2-test-{i}", d) for i, d in enumerate(corpus_documents("test"))], info


def open_ended_items(tokenizer, documents: Sequence[Prompt], prefix_tokens: int = 50, max_new_tokens: int = 100,
                     num: int | None = 1000, seed: int = 0) -> list[dict]:
    """Prompts and reference continuations of the documents with ``prefix + max_new`` tokens.

    Rows: ``id``, ``prompt`` (text), ``prompt_tokens`` (prefix re-encoded with BOS),
    ``reference_tokens`` (the next ``max_new_tokens`` document tokens), ``reference``.
    """
    mode = MiningConfig(mode="open_ended", prefix_tokens=prefix_tokens)
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
        text, prompt_ids = encode_prompt(tokenizer, doc.text, mode)
        ref = ids[prefix_tokens : prefix_tokens + max_new_tokens]
        items.append({"id": doc.source_id, "prompt": text, "prompt_tokens": prompt_ids, "reference_tokens": ref,
                      "reference": _continuation_text(tokenizer, ids[:prefix_tokens], ref)})
    return items


def embedded_instructions() -> str:
    """Path of the embedded 252 Self-Instruct user-oriented instructions (Apache-2.0, see its README)."""
    return str(resources.files("axolotl_focus").joinpath("data/self-instruct/user_oriented_instructions.jsonl"))


def _rows_of(source: str, config: str | None, split: str) -> list[tuple[Any, dict]]:
    if os.path.isfile(source):
        with open(source, encoding="utf-8") as handle:
            content = handle.read()
        if content.lstrip().startswith("["):
            return list(enumerate(json.loads(content)))
        return [(n, json.loads(line)) for n, line in enumerate(content.split("\n"), 1) if line.strip()]
    if source.endswith((".jsonl", ".json")) or source.startswith(("/", "./", "../")):
        raise FileNotFoundError(f"instructions: {source} not found")
    import datasets

    return list(enumerate(datasets.load_dataset(source, config, split=split)))


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


def _instruction_items(tokenizer, rows: list[dict], chat_template: bool) -> list[dict]:
    mode = MiningConfig(mode="instruction", chat_template=chat_template)
    items = []
    for row in rows:
        text, ids = encode_prompt(tokenizer, row["text"], mode)
        items.append({"id": row["id"], "prompt": text, "prompt_tokens": ids, "reference": row["reference"]})
    return items


# --------------------------------------------------------------------------------------------
# Generation (saved, reused)
# --------------------------------------------------------------------------------------------


def _decoding_key(decoding: str, top_p: float) -> str:
    return f"top_p{top_p:g}" if decoding == "top_p" else "greedy"


def _generate_items(model, tokenizer, items: list[dict], budget: int, *, do_sample: bool, seed: int, top_p: float,
                    temperature: float, batch_size: int, desc: str, progress: bool,
                    paths: tuple[str, str] | None = None) -> list[dict]:
    """Rows of generations for ``items``: batches of ``batch_size`` consecutive items, batch ``b``
    under torch seed ``seed * 100003 + b``. Under several processes the batches are shared out
    (:class:`_Ranks`; ``paths`` = the model's and the tokenizer's, for the other ranks to load)."""
    job = {"prompts": [it["prompt_tokens"] for it in items], "budget": budget, "do_sample": do_sample, "seed": seed,
           "top_p": top_p, "temperature": temperature, "batch_size": batch_size}
    gen = _ranks().generate(model, tokenizer, job, paths, desc=desc, progress=progress)
    rows = []
    for it, (toks, stop) in zip(items, gen, strict=True):
        rows.append({**{k: it[k] for k in ("id", "prompt", "prompt_tokens")}, "tokens": toks,
                     "text": _continuation_text(tokenizer, it["prompt_tokens"], toks), "stop": stop or "budget",
                     **{k: it[k] for k in ("reference", "reference_tokens") if k in it}})
    return rows


def _generations(path: Path, meta: dict, make: Callable[[], list[dict]], cfg: EvalConfig) -> list[dict]:
    """Rows of ``path`` when its ``.meta.json`` equals ``meta``; else ``make()`` and save both."""
    meta_path = path.with_name(path.name + ".meta.json")
    meta = _jsonable(meta)
    if not cfg.regenerate and path.is_file() and _read_json(meta_path) == meta:
        with open(path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    if cfg.metrics_only:
        raise MetricUnavailable(f"generations {path} missing or made with other settings (--metrics-only)")
    rows = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    if meta_path.exists():
        meta_path.unlink()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(tmp, path)
    _write_json(meta_path, meta)
    return rows


def generation_metrics(rows: list[dict], vocab_size: int, max_new_tokens: int,
                       threshold: float = DEFAULT_THRESHOLD) -> dict[str, float]:
    """CREP, rep-3..6, EAD-1 (:func:`repetition_metrics`), serving degeneration, lengths."""
    toks = [r["tokens"] for r in rows]
    out = repetition_metrics(toks, vocab_size, threshold, REP_NS)
    serving = serving_degeneration(toks, max_new_tokens, threshold)
    out.update(serving_rate=serving.rate_pct, serving_token_share=serving.token_share_pct,
               serving_stoppable_tokens=serving.stoppable_tokens,
               mean_length=sum(map(len, toks)) / len(toks) if toks else 0.0,
               eos_rate=100.0 * sum(r["stop"] == "eos" for r in rows) / len(rows) if rows else 0.0)
    return out


def _mean_dicts(dicts: list[dict]) -> dict:
    keys = [k for k in dicts[0] if all(isinstance(d.get(k), (int, float)) for d in dicts)] if dicts else []
    return {k: sum(d[k] for d in dicts) / len(dicts) for k in keys}


# --------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------


def _ppl_source(cfg: EvalConfig, default: Callable[[], tuple[list[str] | None, dict]] = default_wikitext
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
    from .micro import corpus_text

    return lambda: corpus_text("test"), info


def _ppl_text(cfg: EvalConfig) -> str:
    """The text of an explicit ``--ppl-data`` (a text file, a JSON-lines file or a hub dataset)."""
    if os.path.isfile(cfg.ppl_data) and not cfg.ppl_data.endswith((".jsonl", ".json")):
        return Path(cfg.ppl_data).read_text(encoding="utf-8")
    if os.path.isfile(cfg.ppl_data):
        return "\n\n".join(p.text for p in load_prompts(cfg.ppl_data, text_field=cfg.ppl_text_field, input_field=None))
    return "\n\n".join(_load_hub_dataset(cfg.ppl_data, cfg.ppl_config, cfg.ppl_split)[cfg.ppl_text_field])


def perplexity(model, tokenizer, text: str | Sequence[int], window: int = 1024, stride: int = 512,
               max_tokens: int | None = None, progress: bool = False) -> dict:
    """Sliding-window perplexity of one token stream (see the module docstring for the exact rule).

    ``text``: a string (encoded as BOS + tokens) or token ids used as they are. Returns ``ppl``,
    ``nll`` (mean), ``tokens`` (stream length), ``scored`` tokens, ``window``, ``stride``.
    """
    from tqdm.auto import tqdm

    if stride > window:
        raise ValueError(f"stride ({stride}) must be <= window ({window})")
    if isinstance(text, str):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids
    else:
        ids = list(text)
    ids = ids[:max_tokens] if max_tokens else ids
    limit = getattr(model.config, "max_position_embeddings", None)
    window = min(window, limit) if limit else window
    stride = min(stride, window)
    device = next(model.parameters()).device
    total, scored, prev_end = 0.0, 0, 0
    starts = list(range(0, max(len(ids) - 1, 1), stride))
    with torch.inference_mode():
        for begin in tqdm(starts, desc="perplexity", unit="window", disable=not progress):
            end = min(begin + window, len(ids))
            first = max(begin + 1, prev_end)  # first scored position in this window
            if end > first:
                x = torch.tensor([ids[begin:end]], device=device)
                logits = model(input_ids=x).logits[0, first - begin - 1 : end - begin - 1].float()
                total += torch.nn.functional.cross_entropy(logits, x[0, first - begin : end - begin],
                                                           reduction="sum").item()
                scored += end - first
            prev_end = end
            if end == len(ids):
                break
    nll = total / scored if scored else float("nan")
    return {"ppl": math.exp(nll) if scored else float("nan"), "nll": nll, "tokens": len(ids), "scored": scored,
            "window": window, "stride": stride}


# --------------------------------------------------------------------------------------------
# MAUVE and BERTScore
# --------------------------------------------------------------------------------------------


class _Featurizer:
    """MAUVE features: final-layer hidden state of each text's last token (as ``mauve-text``)."""

    def __init__(self, name: str, device, max_len: int, batch_size: int = 8):
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name)
            self.model = AutoModel.from_pretrained(name).to(device).eval()
        except (OSError, ValueError) as err:
            raise MetricUnavailable(
                f"MAUVE: featurizer model {name!r} cannot be loaded ({type(err).__name__}); pass "
                "--mauve-featurizer PATH (a local gpt2-large checkout, or any local HF model) or run online"
            ) from None
        self.name, self.max_len, self.batch_size = name, max_len, batch_size
        self._cache: dict[str, Any] = {}

    def __call__(self, texts: list[str]):
        key = _digest(texts)
        if key in self._cache:
            return self._cache[key]
        fallback = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        enc = [self.tokenizer(t, add_special_tokens=True, truncation=True, max_length=self.max_len)["input_ids"]
               or [fallback] for t in texts]
        order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
        feats = [None] * len(enc)
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            for b in range(0, len(order), self.batch_size):
                idx = order[b : b + self.batch_size]
                width = max(len(enc[i]) for i in idx)
                x = torch.tensor([enc[i] + [0] * (width - len(enc[i])) for i in idx], device=device)
                mask = torch.tensor([[1] * len(enc[i]) + [0] * (width - len(enc[i])) for i in idx], device=device)
                hidden = self.model(input_ids=x, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
                for row, i in enumerate(idx):
                    feats[i] = hidden[row, len(enc[i]) - 1].float().cpu()
        out = torch.stack(feats).numpy()
        self._cache[key] = out
        return out


def mauve_score(p_texts: list[str], q_texts: list[str], featurizer: Callable[[list[str]], Any],
                seeds: Sequence[int] = (1, 2, 3, 4, 5), scaling_factor: float = 5.0) -> dict:
    """MAUVE(p = references, q = generations) per seed of ``compute_mauve``, and their mean."""
    mauve = _require("mauve", "mauve-text", "MAUVE")
    p, q = featurizer(p_texts), featurizer(q_texts)
    values = [float(mauve.compute_mauve(p_features=p, q_features=q, seed=s, mauve_scaling_factor=scaling_factor,
                                        verbose=False).mauve) for s in seeds]
    return {"mauve": sum(values) / len(values), "mauve_values": values}


class _BertScorer:
    def __init__(self, cfg: EvalConfig, device):
        bert_score = _require("bert_score", "bert-score", "BERTScore")
        from bert_score.utils import model2layers

        name = cfg.bertscore_model
        layer = cfg.bertscore_layer or model2layers.get(name) or model2layers.get(os.path.basename(name.rstrip("/")))
        if layer is None:
            raise MetricUnavailable(f"BERTScore: no default layer for {name!r}; pass --bertscore-layer N")
        baseline = cfg.bertscore_baseline
        if cfg.bertscore_rescale and baseline is None:
            shipped = Path(bert_score.__file__).parent / "rescale_baseline" / "en" / f"{os.path.basename(name.rstrip('/'))}.tsv"
            baseline = str(shipped) if shipped.is_file() else None
        self.rescaled = bool(cfg.bertscore_rescale and baseline)
        try:
            self.scorer = bert_score.BERTScorer(model_type=name, num_layers=layer, lang="en" if self.rescaled else None,
                                                rescale_with_baseline=self.rescaled, baseline_path=baseline,
                                                device=str(device), batch_size=cfg.batch_size)
        except (OSError, ValueError) as err:
            raise MetricUnavailable(
                f"BERTScore: model {name!r} cannot be loaded ({type(err).__name__}); pass --bertscore-model PATH "
                "(a local roberta-large checkout) and --bertscore-layer, or run online") from None
        tok, limit = self.scorer._tokenizer, getattr(self.scorer._model.config, "max_position_embeddings", 512)
        tok.model_max_length = min(tok.model_max_length, limit - 2 if limit > 512 else limit)
        self.info = {"bertscore_model": name, "bertscore_layer": layer, "bertscore_rescaled": self.rescaled,
                     "bertscore_baseline": baseline}

    def __call__(self, cands: list[str], refs: list[str]) -> float:
        """Mean F1. An empty candidate scores bert-score's own convention for it (raw F1 = 0,
        then rescaled): computed here because bert-score's empty-text path is broken under
        transformers 5 (``build_inputs_with_special_tokens`` is gone)."""
        keep = [i for i, c in enumerate(cands) if c.strip()]
        f1 = [0.0] * len(cands)
        if self.rescaled:
            base = float(self.scorer.baseline_vals[2])
            f1 = [(0.0 - base) / (1.0 - base)] * len(cands)
        if keep:
            _, _, got = self.scorer.score([cands[i] for i in keep], [refs[i] for i in keep])
            for i, v in zip(keep, got.tolist()):
                f1[i] = v
        return sum(f1) / len(f1)


def bertscore_f1(cands: list[str], refs: list[str], cfg: EvalConfig | None = None, device="cpu") -> dict:
    """Mean BERTScore F1 of ``cands`` against ``refs`` (model/layer/rescaling from ``cfg``)."""
    scorer = _BertScorer(cfg or EvalConfig(), device)
    return {"bertscore": scorer(cands, refs), **scorer.info}


# --------------------------------------------------------------------------------------------
# Zero-shot accuracy (lm-evaluation-harness)
# --------------------------------------------------------------------------------------------


def zero_shot(path: str, tasks: Sequence[str] = ZERO_SHOT_TASKS, *, device: str = "cpu", batch_size="auto",
              dtype: str = "auto", limit: float | None = None, trust_remote_code: bool = False,
              include_path: str | None = None) -> dict:
    """``lm_eval.simple_evaluate`` with ``HFLM(pretrained=path)``, 0-shot; accuracies x100.

    ``include_path``: a folder of extra lm-eval task YAMLs (e.g. local copies of the tasks whose
    datasets are files on disk, for offline machines)."""
    _require("lm_eval", "lm-eval", "zero-shot accuracy")
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        lm = HFLM(pretrained=path, device=device, batch_size=batch_size, dtype=dtype, trust_remote_code=trust_remote_code)
        raw = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=0, limit=limit, log_samples=False,
                              task_manager=TaskManager(include_path=include_path),
                              random_seed=0, numpy_random_seed=1234, torch_random_seed=1234)
    except Exception as err:  # noqa: BLE001 - offline task data, unknown task names, ...
        raise MetricUnavailable(
            f"zero-shot: lm-eval could not run {list(tasks)} ({type(err).__name__}: {str(err)[:300]}); the task "
            "datasets come from the hub: run once online (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE unset) to cache them"
        ) from None
    out: dict[str, Any] = {"tasks": {}}
    if raw is None:  # a rank other than lm-eval's rank 0 under several processes
        return out
    for task in tasks:
        res = raw["results"].get(task, {})
        acc, acc_norm = res.get("acc,none"), res.get("acc_norm,none")
        metric = ZERO_SHOT_METRIC.get(task, "acc")
        value = acc_norm if metric == "acc_norm" and acc_norm is not None else acc
        out["tasks"][task] = {"metric": metric, "value": None if value is None else 100 * value,
                              "acc": acc, "acc_norm": acc_norm}
    avg = [out["tasks"][t]["value"] for t in ZERO_SHOT_AVERAGE if t in out["tasks"]]
    if avg and None not in avg and len(avg) == len(ZERO_SHOT_AVERAGE):
        out["average"] = sum(avg) / len(avg)
    if "truthfulqa_mc2" in out["tasks"]:
        out["truthfulqa_mc2"] = out["tasks"]["truthfulqa_mc2"]["value"]
    return out


# --------------------------------------------------------------------------------------------
# Distribution study (section 6)
# --------------------------------------------------------------------------------------------


def top_p_mask(probs: torch.Tensor, top_p: float = 0.9) -> torch.Tensor:
    """Boolean mask of the top-p set per row: the most probable tokens, in order, until their mass
    reaches ``top_p`` (the token that crosses it included; ties broken by token id)."""
    sorted_p, order = torch.sort(probs.double(), dim=-1, descending=True, stable=True)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p
    keep = before < top_p - 1e-12
    return torch.zeros_like(keep).scatter(-1, order, keep)


def _masked_pearson(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.double()
    n = m.sum(-1)
    dx = (x - (x * m).sum(-1, keepdim=True) / n.clamp(min=1)[:, None]) * m
    dy = (y - (y * m).sum(-1, keepdim=True) / n.clamp(min=1)[:, None]) * m
    vx, vy = (dx * dx).sum(-1), (dy * dy).sum(-1)
    r = (dx * dy).sum(-1) / torch.sqrt(vx * vy)
    return torch.where((n >= 2) & (vx > 0) & (vy > 0), r, torch.full_like(r, float("nan")))


def distribution_stats(q: torch.Tensor, p: torch.Tensor, top_p: float = 0.9) -> dict[str, torch.Tensor]:
    """Per-position head/tail agreement and correlation of teacher ``q`` and student ``p`` ([N, V]).

    Returns float64 tensors ``[N]``: ``ar_head``, ``ar_tail`` (NaN when T_q is empty),
    ``cor_head``, ``cor_tail`` (NaN when undefined), ``count_head`` (|H_p|), ``count_head_teacher``
    (|H_q|).
    """
    q, p = q.double(), p.double()
    hq, hp = top_p_mask(q, top_p), top_p_mask(p, top_p)
    tq, tp = ~hq, ~hp
    n_tail = tq.sum(-1).double()
    return {
        "ar_head": (hq & hp).sum(-1).double() / hq.sum(-1).double(),
        "ar_tail": torch.where(n_tail > 0, (tq & tp).sum(-1).double() / n_tail.clamp(min=1),
                               torch.full_like(n_tail, float("nan"))),
        "cor_head": _masked_pearson(q, p, hq),
        "cor_tail": _masked_pearson(q, p, tq),
        "count_head": hp.sum(-1).double(),
        "count_head_teacher": hq.sum(-1).double(),
    }


def _position_logits(model, seqs: list[list[int]], starts: list[int]) -> torch.Tensor:
    """Logits predicting ``seq[start:]`` for each row, stacked: ``[sum(len - start), V]``."""
    device = next(model.parameters()).device
    width = max(map(len, seqs))
    x = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    logits = model(input_ids=x, attention_mask=mask).logits
    rows = [logits[i, st - 1 : len(s) - 1] for i, (s, st) in enumerate(zip(seqs, starts))]
    return torch.cat(rows).float()


def distribution_study(teacher, student, samples: list[dict], top_p: float = 0.9, batch_size: int = 8,
                       chunk: int = 64, progress: bool = False) -> dict:
    """Mean :func:`distribution_stats` over every generated position of the teacher ``samples``
    (rows with ``prompt_tokens`` and ``tokens``), fed to both models."""
    from tqdm.auto import tqdm

    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    positions = 0
    samples = [s for s in samples if s["tokens"]]
    with torch.inference_mode():
        for b in tqdm(range(0, len(samples), batch_size), desc="distribution study", disable=not progress):
            batch = samples[b : b + batch_size]
            seqs = [s["prompt_tokens"] + s["tokens"] for s in batch]
            starts = [len(s["prompt_tokens"]) for s in batch]
            zt, zs = _position_logits(teacher, seqs, starts), _position_logits(student, seqs, starts)
            vocab = min(zt.shape[-1], zs.shape[-1])
            for c in range(0, zt.shape[0], chunk):
                stats = distribution_stats(torch.softmax(zt[c : c + chunk, :vocab], -1),
                                           torch.softmax(zs[c : c + chunk, :vocab], -1), top_p)
                for key, val in stats.items():
                    ok = ~torch.isnan(val)
                    sums[key] = sums.get(key, 0.0) + val[ok].sum().item()
                    counts[key] = counts.get(key, 0) + int(ok.sum())
            positions += zt.shape[0]
    out = {k: sums[k] / counts[k] if counts.get(k) else None for k in sums}
    return out | {"positions": positions, "samples": len(samples), "top_p": top_p}


def _teacher_examples(teacher, samples: list[dict], k: int = 50, quantiles=(0.25, 0.5, 0.9)) -> list[dict]:
    """Sorted top-``k`` teacher probabilities (and the remaining mass) at three positions of the
    first samples: those at the given quantiles of the top-1 probability (for the q / q~ plot)."""
    batch = [s for s in samples if s["tokens"]][:8]
    if not batch:
        return []
    with torch.inference_mode():
        q = torch.softmax(_position_logits(teacher, [s["prompt_tokens"] + s["tokens"] for s in batch],
                                           [len(s["prompt_tokens"]) for s in batch]), -1)
    top = torch.sort(q, dim=-1, descending=True).values
    order = torch.argsort(top[:, 0], stable=True).tolist()
    picks = dict.fromkeys(order[min(int(f * len(order)), len(order) - 1)] for f in quantiles)
    return [{"top": top[i, :k].tolist(), "rest_mass": float(top[i, k:].sum()), "vocab": q.shape[-1]} for i in picks]


# --------------------------------------------------------------------------------------------
# FOCUS reweighting (Figure 2a) and beta/gamma parsing (Figure 3a)
# --------------------------------------------------------------------------------------------


def reweighted(q: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """FOCUS's effective target ``q~ = w q / sum(w q)``, ``w = q^beta + (1-q)^gamma`` (appendix A)."""
    wq = focus_weights(q, beta, gamma) * q
    return wq / wq.sum(-1, keepdim=True)


def toy_zipf(vocab: int = 50, top: tuple[float, float] = (0.8, 0.1), exponent: float = 1.0) -> torch.Tensor:
    """The paper's toy distribution: top two tokens 0.8 / 0.1, the rest Zipf over the tail."""
    tail = torch.tensor([1.0 / (r ** exponent) for r in range(3, vocab + 1)], dtype=torch.float64)
    tail = tail / tail.sum() * (1.0 - sum(top))
    return torch.cat([torch.tensor(top, dtype=torch.float64), tail])


def focus_params_of(name: str, path: str | None = None, mapping: dict | None = None) -> tuple[float, float] | None:
    """(beta, gamma) of a FOCUS run, from the first of:

    1. ``mapping[name]`` (``--focus-params``);
    2. ``<path>/focus_training.json`` (the trainer's record in its ``output_dir``), then
       ``<path>/../focus_training.json`` (a LoRA-merged model saved under ``<output_dir>/merged``):
       ``focus_beta`` / ``focus_gamma``; a record whose ``focus_distill`` is not ``focus`` (a KD or
       CE run) gives None;
    3. ``focus_beta`` / ``focus_gamma`` in the checkpoint's config.json;
    4. ``beta<x>`` / ``gamma<y>`` in the name (``-``, ``_`` or ``=`` allowed).

    A missing gamma means the default 1.0."""
    if mapping and name in mapping:
        return tuple(map(float, mapping[name]))
    if path and os.path.isdir(path):
        record = None
        for folder in (Path(path), Path(path).resolve().parent):  # the first record found is the run's
            try:
                record = _read_json(folder / TRAINING_RECORD)
            except (OSError, ValueError):  # unreadable / not JSON: as if absent
                record = None
            if isinstance(record, dict):
                break
        if isinstance(record, dict):
            if record.get("focus_distill", "focus") != "focus":
                return None
            if record.get("focus_beta") is not None:
                gamma = record.get("focus_gamma")
                return float(record["focus_beta"]), float(1.0 if gamma is None else gamma)
        conf = _read_json(Path(path) / "config.json")
        if conf and "focus_beta" in conf:
            return float(conf["focus_beta"]), float(conf.get("focus_gamma", 1.0))
    num = r"[-_=]?(\d+(?:\.\d+)?|\.\d+)"
    beta = re.search(r"beta" + num, name, re.I)
    if not beta:
        return None
    gamma = re.search(r"gamma" + num, name, re.I)
    return float(beta.group(1)), float(gamma.group(1)) if gamma else 1.0


# --------------------------------------------------------------------------------------------
# Several processes: data-parallel generation
# --------------------------------------------------------------------------------------------

WORKER_TIMEOUT_H = 24  # how long the other ranks may wait for rank 0 (its metrics) between requests


class _Ranks:
    """The processes of a run. One process: everything runs in it. Several (``torchrun`` /
    ``accelerate launch``, one per device): rank 0 runs the evaluation (data, metrics, files)
    and the other ranks wait in :meth:`serve` for its requests: generation (a request's batches
    are shared out with ``PartialState().split_between_processes``, every rank generates its
    batches on its own ``PartialState().device`` and rank 0 collects them with ``gather_object``),
    zero-shot (lm-eval's own data parallelism needs every rank), releasing models, stop.
    Requests and results travel over a gloo group whose timeout is :data:`WORKER_TIMEOUT_H`
    hours, so the other ranks can wait while rank 0 computes PPL, MAUVE or BERTScore."""

    def __init__(self):
        from .mining import _partial_state

        self.state = _partial_state()
        self.size, self.rank = self.state.num_processes, self.state.process_index
        self.group = None
        self._models: dict[str, Any] = {}
        self._tokenizers: dict[str, Any] = {}
        if self.size > 1:
            import datetime

            import torch.distributed as dist

            self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=WORKER_TIMEOUT_H))

    # messages (rank 0 -> all, all -> rank 0)
    def _send(self, kind: str, job: dict | None = None) -> None:
        import torch.distributed as dist

        if self.size > 1:
            dist.broadcast_object_list([(kind, job)], src=0, group=self.group)

    def _receive(self) -> tuple[str, dict | None]:
        import torch.distributed as dist

        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def _gather(self, obj) -> list | None:
        import torch.distributed as dist

        out = [None] * self.size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    # rank 0's side
    def generate(self, model, tokenizer, job: dict, paths: tuple[str, str] | None, desc: str = "",
                 progress: bool = False) -> list[tuple[list[int], str | None]]:
        """``(tokens, stop reason)`` per prompt of ``job``, in order (on the other ranks: ``[]``)."""
        if self.size > 1 and self.rank == 0:
            if paths is None:
                raise ValueError("several processes: a generation request needs the model and tokenizer paths")
            self._send("generate", job | {"model": paths[0], "tokenizer": paths[1]})
        from tqdm.auto import tqdm

        size, prompts = job["batch_size"], job["prompts"]
        starts = list(range(0, len(prompts), size))
        done: dict[int, list] = {}
        # split_between_processes hands a rank past the end a copy of the last batch: skipped below
        with self.state.split_between_processes(list(range(len(starts)))) as mine:
            for b in tqdm(mine, desc=desc, unit="batch", disable=not (progress and self.rank == 0)):
                if b in done:
                    continue
                batch = prompts[starts[b] : starts[b] + size]
                gen = generate_batch(model, tokenizer, batch, [job["budget"]] * len(batch),
                                     seed=job["seed"] * 100003 + b, do_sample=job["do_sample"], top_p=job["top_p"],
                                     temperature=job["temperature"])
                done[b] = list(zip(gen.tokens, gen.reason))
        if self.size > 1:
            parts = self._gather(done)
            if self.rank != 0:
                return []
            done = {}
            for part in parts:
                for b, rows in part.items():
                    done.setdefault(b, rows)
        return [row for b in range(len(starts)) for row in done[b]]

    def zero_shot(self, **kwargs) -> dict:
        self._send("zero_shot", kwargs)
        return zero_shot(**kwargs)

    def release(self) -> None:
        self._send("release")

    def stop(self) -> None:
        self._send("stop")

    # the other ranks' side
    def serve(self, cfg: EvalConfig) -> None:
        """Answer rank 0's requests until it sends ``stop``."""
        from transformers import AutoTokenizer

        while True:
            kind, job = self._receive()
            if kind == "stop":
                break
            if kind == "generate":
                path = job["model"]
                if path not in self._models:
                    if len(self._models) >= 2:  # rank 0 holds at most a student and the teacher
                        self._models.pop(next(iter(self._models)))
                    self._models[path] = load_model(path, cfg)
                self._models[path] = self._models.pop(path)  # most recently used last
                if job["tokenizer"] not in self._tokenizers:
                    self._tokenizers[job["tokenizer"]] = AutoTokenizer.from_pretrained(
                        job["tokenizer"], trust_remote_code=cfg.trust_remote_code)
                self.generate(self._models[path], self._tokenizers[job["tokenizer"]], job, None)
            elif kind == "zero_shot":
                self._release_models()
                try:
                    zero_shot(**job)
                except MetricUnavailable:
                    pass  # rank 0 reports it
            elif kind == "release":
                self._release_models()
        self._release_models()

    def _release_models(self) -> None:
        if self._models:
            self._models.clear()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


_RANKS: _Ranks | None = None


def _ranks() -> _Ranks:
    """This process's :class:`_Ranks` (made once: the gloo group must be created by every rank)."""
    global _RANKS
    if _RANKS is None:
        _RANKS = _Ranks()
    return _RANKS


# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------


def load_model(path: str, cfg: EvalConfig):
    """``AutoModelForCausalLM.from_pretrained`` (pruned checkpoints included) on the eval device."""
    from transformers import AutoModelForCausalLM

    from . import modeling_pruned_llama  # noqa: F401  (registers pruned_llama)

    dtype = cfg.dtype if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    return model.to(_device(cfg)).eval()


def _device(cfg: EvalConfig) -> torch.device:
    """``--device``, else cuda when available, else cpu; under several processes each rank's own
    ``PartialState().device`` (``--device`` ignored)."""
    ranks = _ranks()
    if ranks.size > 1:
        return ranks.state.device
    return torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))


class _Lazy:
    """A model loaded on first use (so reruns on saved generations never load it)."""

    def __init__(self, path: str, cfg: EvalConfig):
        self.path, self.cfg, self._model = path, cfg, None

    @property
    def model(self):
        if self._model is None:
            if self.cfg.metrics_only:
                raise MetricUnavailable(f"{self.path}: --metrics-only never loads a model")
            self._model = load_model(self.path, self.cfg)
        return self._model

    def release(self):
        self._model = None
        _ranks().release()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@dataclass
class _Shared:
    """State shared across models: scorers, the teacher, messages already logged."""

    cfg: EvalConfig
    featurizer: Any = None
    bertscorer: Any = None
    teacher: Any = None
    failed: dict = field(default_factory=dict)
    wikitext: Any = None  # (rows | None, info) of default_wikitext(), resolved once per run

    def default_data(self) -> tuple[list[str] | None, dict]:
        if self.wikitext is None:
            self.wikitext = default_wikitext()
        return self.wikitext

    def get(self, attr: str, make: Callable[[], Any]):
        if attr in self.failed:
            raise MetricUnavailable(self.failed[attr])
        if getattr(self, attr) is None:
            try:
                setattr(self, attr, make())
            except MetricUnavailable as err:
                self.failed[attr] = str(err)
                raise
        return getattr(self, attr)


def _model_dir(cfg: EvalConfig, name: str) -> Path:
    return Path(cfg.output_dir) / re.sub(r"[^\w.+-]", "_", name)


def _unavailable(res: dict, key: str, err: Exception) -> None:
    msg = str(err)
    if res["unavailable"].get(key) != msg:
        LOG.warning("%s: %s", res["model"], msg)
    res["unavailable"][key] = msg


def _teacher_samples(cfg: EvalConfig, shared: _Shared, tokenizer, items: list[dict], tokenizer_path: str) -> list[dict]:
    items = items[: cfg.distribution_samples]
    seed = cfg.seeds[0] if cfg.seeds else 0
    path = Path(cfg.output_dir) / "_teacher" / "distribution_samples.jsonl"
    meta = {"teacher": cfg.teacher, "prompts": _digest([it["prompt_tokens"] for it in items]), "seed": seed,
            "top_p": cfg.top_p, "temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens,
            "batch_size": cfg.batch_size}
    return _generations(path, meta, lambda: _generate_items(
        shared.get("teacher", lambda: _Lazy(cfg.teacher, cfg)).model, tokenizer, items, cfg.max_new_tokens,
        do_sample=True, seed=seed, top_p=cfg.top_p, temperature=cfg.temperature, batch_size=cfg.batch_size,
        desc="teacher samples", progress=cfg.progress, paths=(cfg.teacher, tokenizer_path)), cfg)


def evaluate_model(name: str, path: str, cfg: EvalConfig, shared: _Shared | None = None) -> dict:
    """Every configured metric for one model; writes ``<output_dir>/<name>/results.json``.
    Under several processes call :func:`evaluate_models` instead (on every rank)."""
    from transformers import AutoTokenizer

    shared = shared or _Shared(cfg)
    mdir = _model_dir(cfg, name)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    lazy = _Lazy(path, cfg)
    vocab = len(tokenizer)
    res: dict[str, Any] = {
        "model": name, "path": path, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": _versions(),
        "settings": _jsonable({k: v for k, v in asdict(cfg).items() if k not in ("progress", "focus_params")}),
        "ead_vocab_size": vocab, "processes": _ranks().size, "data": {}, "unavailable": {}, "notes": [],
    }
    metrics = set(cfg.metrics)

    if "ppl" in metrics:
        text, res["data"]["ppl"] = _ppl_source(cfg, shared.default_data)
        meta = {"path": path, "data": res["data"]["ppl"]["source"], "config": cfg.ppl_config,
                "split": cfg.ppl_split, "window": cfg.ppl_window, "stride": cfg.ppl_stride, "max": cfg.ppl_max_tokens}
        try:
            res["perplexity"] = _cached(mdir / "perplexity.json", meta, lambda: perplexity(
                lazy.model, tokenizer, text(), cfg.ppl_window, cfg.ppl_stride, cfg.ppl_max_tokens,
                cfg.progress) | {"data": meta["data"]}, cfg, "perplexity")
        except MetricUnavailable as err:
            _unavailable(res, "ppl", err)

    open_items: list[dict] = []
    for task in cfg.tasks:
        if task == "open_ended":
            docs, res["data"]["open_ended"] = _documents(cfg, shared.default_data)
            items = open_items = open_ended_items(tokenizer, docs, cfg.prefix_tokens, cfg.max_new_tokens,
                                                  cfg.num_documents, cfg.data_seed)
            budget = cfg.max_new_tokens
            if len(items) < cfg.num_documents:
                res["notes"].append(f"open_ended: {len(items)} documents have >= {cfg.prefix_tokens} + "
                                    f"{cfg.max_new_tokens} tokens (asked for {cfg.num_documents})")
        else:
            rows = load_instructions(cfg.instructions or embedded_instructions(), config=cfg.instructions_config,
                                     split=cfg.instructions_split, limit=cfg.num_instructions)
            res["data"]["instruction"] = {"source": cfg.instructions or "embedded:self-instruct/user_oriented",
                                          "config": cfg.instructions_config, "split": cfg.instructions_split}
            items, budget = _instruction_items(tokenizer, rows, cfg.chat_template), cfg.instruction_max_new_tokens
        if not items:
            res["unavailable"][task] = f"{task}: no prompts (open-ended needs documents of >= prefix + new tokens)"
            continue
        block: dict[str, Any] = {"prompts": len(items), "max_new_tokens": budget, "decodings": {}}
        if task == "open_ended":
            block["prefix_tokens"] = cfg.prefix_tokens
            block["reference"] = generation_metrics(
                [{"tokens": it["reference_tokens"], "stop": "budget"} for it in items], vocab, budget, cfg.threshold)
        prompts_digest = _digest([(it["id"], it["prompt_tokens"]) for it in items])
        for decoding in cfg.decodings:
            key = _decoding_key(decoding, cfg.top_p)
            per_seed = {}
            for seed in (cfg.seeds if decoding == "top_p" else [None]):
                label = key if seed is None else f"{key}.seed{seed}"
                meta = {"path": path, "task": task, "decoding": key, "seed": seed, "max_new_tokens": budget,
                        "temperature": cfg.temperature if seed is not None else None, "prompts": prompts_digest,
                        "batch_size": cfg.batch_size}
                try:
                    rows = _generations(mdir / "generations" / f"{task}.{label}.jsonl", meta, lambda: _generate_items(
                        lazy.model, tokenizer, items, budget, do_sample=seed is not None, seed=seed or 0, top_p=cfg.top_p,
                        temperature=cfg.temperature, batch_size=cfg.batch_size, desc=f"{name} {task} {label}",
                        progress=cfg.progress, paths=(path, path)), cfg)
                except MetricUnavailable as err:
                    _unavailable(res, f"{task}.{label}", err)
                    continue
                m = generation_metrics(rows, vocab, budget, cfg.threshold) if metrics & {"repetition", "serving"} else {}
                if "mauve" in metrics and task == "open_ended":
                    try:
                        feat = shared.get("featurizer", lambda: (_require("mauve", "mauve-text", "MAUVE"), _Featurizer(
                            cfg.mauve_featurizer, _device(cfg), cfg.mauve_max_text_length))[1])
                        m |= mauve_score([r["reference"] for r in rows], [r["text"] for r in rows], feat, cfg.mauve_seeds,
                                         cfg.mauve_scaling_factor)
                    except MetricUnavailable as err:
                        _unavailable(res, "mauve", err)
                if "bertscore" in metrics and task == "instruction":
                    pairs = [(r["text"], r["reference"]) for r in rows if r["reference"].strip()]
                    try:
                        scorer = shared.get("bertscorer", lambda: _BertScorer(cfg, _device(cfg)))
                        m |= {"bertscore": scorer(*map(list, zip(*pairs)))} if pairs else {}
                        res["bertscore_settings"] = scorer.info
                    except MetricUnavailable as err:
                        _unavailable(res, "bertscore", err)
                per_seed["greedy" if seed is None else str(seed)] = m
            if per_seed:
                block["decodings"][key] = {"seeds": per_seed, "mean": _mean_dicts(list(per_seed.values()))}
        res[task] = block

    if "distribution" in metrics:
        try:
            if "open_ended" not in cfg.tasks:
                raise MetricUnavailable("distribution study: needs the open_ended task (its prompts)")
            if not cfg.teacher:
                raise MetricUnavailable("distribution study: pass --teacher PATH (the unpruned model)")
            if os.path.abspath(cfg.teacher) == os.path.abspath(path):
                raise MetricUnavailable("distribution study: this model is the teacher")
            samples = _teacher_samples(cfg, shared, tokenizer, open_items, path)
            meta = {"teacher": cfg.teacher, "student": path, "samples": _digest([s["tokens"] for s in samples]),
                    "top_p": cfg.head_top_p}

            def study():
                teacher = shared.get("teacher", lambda: _Lazy(cfg.teacher, cfg)).model
                out = distribution_study(teacher, lazy.model, samples, cfg.head_top_p, cfg.batch_size,
                                         progress=cfg.progress)
                return out | {"teacher": cfg.teacher, "teacher_examples": _teacher_examples(teacher, samples)}

            res["distribution"] = _cached(mdir / "distribution.json", meta, study, cfg, "distribution study")
        except MetricUnavailable as err:
            _unavailable(res, "distribution", err)

    if "zero_shot" in metrics:
        lazy.release()
        meta = {"path": path, "tasks": list(cfg.zero_shot_tasks), "limit": cfg.zero_shot_limit,
                "include": cfg.zero_shot_include}
        try:
            res["zero_shot"] = _cached(mdir / "zero_shot.json", meta, lambda: _ranks().zero_shot(
                path=path, tasks=cfg.zero_shot_tasks, device=str(_device(cfg)), batch_size=cfg.zero_shot_batch_size,
                dtype=cfg.dtype, limit=cfg.zero_shot_limit, trust_remote_code=cfg.trust_remote_code,
                include_path=cfg.zero_shot_include), cfg, "zero-shot")
        except MetricUnavailable as err:
            _unavailable(res, "zero_shot", err)
    lazy.release()
    _write_json(mdir / "results.json", res)
    return res


def _model_specs(models) -> list[tuple[str, str]]:
    if isinstance(models, dict):
        specs = list(models.items())
    else:
        specs = []
        for m in models:
            name, _, path = m.partition("=") if "=" in m and not os.path.exists(m) else ("", "", m)
            if "=" in m and not os.path.exists(m) and not (name.strip() and path.strip()):
                raise ValueError(f"models: {m!r} is not NAME=PATH (both parts are needed) nor an existing path")
            specs.append((name or os.path.basename(os.path.normpath(path)), path))
    names = [n for n, _ in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"models: duplicate names {names}; use NAME=PATH")
    return specs


def evaluate_models(models: Sequence[str] | dict[str, str], cfg: EvalConfig) -> list[dict]:
    """Evaluate every model (``[path | "NAME=PATH"]`` or ``{name: path}``) and write
    ``results.json`` per model, ``results.md`` and the plots. Returns the results in order.

    Under several processes (``torchrun`` / ``accelerate launch``) every rank calls this with the
    same arguments: rank 0 evaluates and returns the results, the other ranks generate their
    share of every batch of prompts for it and return ``[]`` (see :class:`_Ranks`)."""
    cfg = replace(cfg).validate()
    specs = _model_specs(models)
    ranks = _ranks()
    if ranks.size > 1:
        if ranks.rank != 0:
            ranks.serve(cfg)
            return []
        if cfg.device:
            LOG.warning("--device %s ignored: %d processes, each on its own device", cfg.device, ranks.size)
        LOG.info("%d processes: generation batches are shared out; rank 0 computes the metrics and writes the "
                 "files", ranks.size)
    if not cfg.teacher and "distribution" in cfg.metrics:
        from .config import source_model_of

        cfg.teacher = next((t for t in (source_model_of(p) for _, p in specs) if t), None)
    shared = _Shared(cfg)
    results = [evaluate_model(name, path, cfg, shared) for name, path in specs]
    ranks.stop()  # the other ranks are done (on an error they are ended by the launcher)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown_report(results), encoding="utf-8")
    if cfg.plots:
        msg = make_plots(results, out / "plots", {n: focus_params_of(n, p, cfg.focus_params) for n, p in specs},
                         cfg.focus_toy)
        if msg:
            LOG.warning(msg)
    return results


# --------------------------------------------------------------------------------------------
# Report: Markdown tables
# --------------------------------------------------------------------------------------------

# (header, key, higher_is_better (None: no ranking), decimals)
_SERVING = [("Serving deg. %", "serving_rate", False, 2), ("Serving tokens %", "serving_token_share", False, 2)]
_OPEN = [("PPL", "ppl", False, 2), ("0-shot", "zero_shot", True, 2), ("MAUVE", "mauve", True, 3),
         ("CREP", "crep", False, 2)] + [(f"rep-{n}", f"rep-{n}", False, 2) for n in REP_NS] + _SERVING
_INSTR = [("PPL", "ppl", False, 2), ("0-shot", "zero_shot", True, 2), ("CREP", "crep", False, 2),
          ("EAD-1", "ead", True, 3), ("BERTScore", "bertscore", True, 3)] + _SERVING + [
          ("EOS %", "eos_rate", None, 1), ("mean length", "mean_length", None, 1)]
_DIST = [("AR_head", "ar_head", True, 3), ("AR_tail", "ar_tail", True, 3), ("COR_head", "cor_head", True, 3),
         ("COR_tail", "cor_tail", True, 3), ("count_head", "count_head", None, 1),
         ("count_head (teacher)", "count_head_teacher", None, 1)]
_ZS_NAMES = {"arc_challenge": "Arc.c", "piqa": "PIQA", "boolq": "BoolQ", "openbookqa": "OpenQA",
             "hellaswag": "Hellaswag", "winogrande": "Winogrande", "truthfulqa_mc2": "TruthfulQA-MC2"}


def _markdown_table(title: str, rows: list[tuple[str, dict]], cols: list[tuple], extra: list[tuple[str, dict]] = ()) -> str:
    """Rows = models; the best value per ranked column in bold (ties all bold); ``extra`` rows
    (the human reference) are shown but never ranked."""
    head = [f"{h} ({'↑' if hib else '↓'})" if hib is not None else h for h, _, hib, _ in cols]
    lines = [f"### {title}", "", "| Method | " + " | ".join(head) + " |", "|---" * (len(cols) + 1) + "|"]
    best = {}
    for _, key, hib, dec in cols:
        vals = [round(v[key], dec) for _, v in rows if isinstance(v.get(key), (int, float)) and math.isfinite(v[key])]
        if hib is not None and len(vals) > 1:
            best[key] = max(vals) if hib else min(vals)
    for label, vals, ranked in [(lbl, v, True) for lbl, v in rows] + [(lbl, v, False) for lbl, v in extra]:
        cells = []
        for _, key, _, dec in cols:
            v = vals.get(key)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                cells.append("-")
                continue
            text = f"{v:.{dec}f}"
            cells.append(f"**{text}**" if ranked and key in best and round(v, dec) == best[key] else text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _flat(res: dict, task: str, decoding: str) -> dict:
    out = dict(res.get(task, {}).get("decodings", {}).get(decoding, {}).get("mean", {}))
    if "perplexity" in res:
        out["ppl"] = res["perplexity"]["ppl"]
    if res.get("zero_shot", {}).get("average") is not None:
        out["zero_shot"] = res["zero_shot"]["average"]
    return out


def markdown_report(results: list[dict]) -> str:
    """The paper's tables across models: method rows, metric columns, best per column in bold."""
    if not results:
        return "No results.\n"
    parts = ["# Evaluation results", ""]
    first = results[0]
    settings = first["settings"]
    for task, cols, title in (("open_ended", _OPEN, "Open-ended generation (Table 3)"),
                              ("instruction", _INSTR, "Instruction-based generation (Table 4)")):
        decodings = []
        for r in results:
            decodings += [d for d in r.get(task, {}).get("decodings", {}) if d not in decodings]
        for dec in decodings:
            rows = [(r["model"], _flat(r, task, dec)) for r in results]
            seeds = "" if dec == "greedy" else f", mean over seeds {settings['seeds']}"
            extra = [("Reference (human)", first[task]["reference"])] if task == "open_ended" and "reference" in first.get(task, {}) else []
            parts.append(_markdown_table(f"{title}: {dec}{seeds}", rows, cols, extra))
    zs = [r for r in results if r.get("zero_shot")]
    if zs:
        tasks = [t for t in ZERO_SHOT_TASKS if any(t in r["zero_shot"]["tasks"] for r in zs)]
        cols = [(_ZS_NAMES.get(t, t), t, True, 2) for t in tasks if t != "truthfulqa_mc2"] + [("Average", "average", True, 2)]
        cols += [("TruthfulQA-MC2", "truthfulqa_mc2", True, 2)] if "truthfulqa_mc2" in tasks else []
        rows = [(r["model"], {t: v["value"] for t, v in r["zero_shot"]["tasks"].items()} | r["zero_shot"]) for r in zs]
        parts.append(_markdown_table("Zero-shot accuracy (Table 6)", rows, cols))
    dist = [(r["model"], r["distribution"]) for r in results if r.get("distribution")]
    if dist:
        parts.append(_markdown_table(f"Distribution study vs the teacher (section 6, head = top-p "
                                     f"{settings['head_top_p']})", dist, _DIST))
    ppl = first.get("perplexity", {})
    bs = next((r["bertscore_settings"] for r in results if r.get("bertscore_settings")), None)
    notes = [
        "↓ lower is better, ↑ higher is better; best per column in **bold** (ties all bold; the reference row is not ranked).",
        f"CREP: % of continuations with coverage >= {settings['threshold']} (r = 4..16). rep-n: 100 x mean over "
        "continuations of (1 - unique n-grams / n-grams), model tokens (the paper's 'unique n-gram'; lower = more diverse).",
        f"EAD-1: corpus-level, V = len(tokenizer) = {first.get('ead_vocab_size')}.",
        f"Open-ended: {settings['prefix_tokens']}-token prefix, {settings['max_new_tokens']} new tokens, top-p "
        f"{settings['top_p']} (top_k = 0) and greedy. Paper's WikiText-103 human row: 2.62 / 1.10 / 0.52 / 0.24 (n = 3..6).",
    ]
    docs = first.get("data", {}).get("open_ended")
    if docs:
        notes.append(f"Open-ended documents: {docs['source']}" + (f" (fallback: {docs['fallback']})"
                                                                 if docs.get("fallback") else "") + ".")
    if ppl:
        notes.append(f"PPL: {ppl.get('data')}, window {ppl['window']}, stride {ppl['stride']}, {ppl['scored']} tokens scored.")
    if any("mauve" in _flat(r, "open_ended", d) for r in results for d in r.get("open_ended", {}).get("decodings", {})):
        notes.append(f"MAUVE: p = reference continuations, q = generations, featurizer {settings['mauve_featurizer']}, "
                     f"mean over compute_mauve seeds {settings['mauve_seeds']}.")
    if bs:
        notes.append(f"BERTScore: F1, {bs['bertscore_model']} layer {bs['bertscore_layer']}, "
                     f"{'rescaled with baseline' if bs['bertscore_rescaled'] else 'not rescaled'}.")
    unavailable = {f"{r['model']}: {k}": v for r in results for k, v in r.get("unavailable", {}).items()}
    parts.append("Notes:\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    if unavailable:
        parts.append("Unavailable:\n\n" + "\n".join(f"- {k}: {v}" for k, v in unavailable.items()) + "\n")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def make_plots(results: list[dict], out_dir: str | os.PathLike, focus_params: dict | None = None,
               toy_params: Sequence[tuple[float, float]] = ((5.0, 1.0), (15.0, 1.0), (15.0, 3.0))) -> str | None:
    """PNG plots; returns a message (and writes nothing) when matplotlib is missing.

    ``repetition.png`` (CREP and rep-n per model, open-ended top-p), ``focus_reweighting.png``
    (q vs q~ for the toy Zipf distribution and, when a distribution study ran, real teacher
    distributions), ``distribution.png`` (AR/COR per model), ``focus_beta_gamma.png`` (rep-n
    against (beta, gamma) when at least two models have FOCUS parameters).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"plots skipped: matplotlib is not installed ({EXTRA})"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [r["model"] for r in results]
    dec = next((d for r in results for d in r.get("open_ended", {}).get("decodings", {}) if d != "greedy"), "greedy")
    flat = [_flat(r, "open_ended", dec) for r in results]

    if any("crep" in f for f in flat):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        a1.bar(names, [f.get("crep", float("nan")) for f in flat], color="tab:red")
        a1.set_ylabel("CREP (%)")
        a1.set_title(f"CREP ({dec})")
        width = 0.8 / len(REP_NS)
        for k, n in enumerate(REP_NS):
            a2.bar([i + k * width for i in range(len(names))], [f.get(f"rep-{n}", float("nan")) for f in flat],
                   width, label=f"n={n}")
        a2.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names)
        a2.set_ylabel("rep-n (%)")
        a2.set_title("rep-n (lower = more diverse)")
        a2.legend()
        for ax in (a1, a2):
            ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        fig.savefig(out / "repetition.png", dpi=120)
        plt.close(fig)

    examples = next((r["distribution"].get("teacher_examples") for r in results if r.get("distribution")), None) or []
    fig, axes = plt.subplots(1, 1 + len(examples), figsize=(5 * (1 + len(examples)), 4), squeeze=False)
    dists = [("toy Zipf (0.8 / 0.1 / tail)", toy_zipf(), 0.0)]
    dists += [(f"teacher, top-1 q = {e['top'][0]:.2f}", torch.tensor(e["top"], dtype=torch.float64), e["rest_mass"])
              for e in examples]
    for ax, (title, q, rest) in zip(axes[0], dists):
        # a real distribution is shown by its top-k; the rest of the vocabulary enters Z as one lump
        # (tiny q, so w ~ 1 there): Z = sum_topk w q + rest.
        x = range(1, len(q) + 1)
        ax.plot(x, q.numpy(), "k-o", ms=3, label="q")
        for beta, gamma in toy_params:
            wq = focus_weights(q, beta, gamma) * q
            ax.plot(x, (wq / (wq.sum() + rest)).numpy(), "-", label=f"q~ β={beta:g} γ={gamma:g}")
        ax.set_yscale("log")
        ax.set_xlabel("token rank")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "focus_reweighting.png", dpi=120)
    plt.close(fig)

    dist = [(r["model"], r["distribution"]) for r in results if r.get("distribution")]
    if dist:
        keys = ["ar_head", "ar_tail", "cor_head", "cor_tail"]
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.8 / len(dist)
        for k, (name, d) in enumerate(dist):
            ax.bar([i + k * width for i in range(len(keys))],
                   [d.get(key) if d.get(key) is not None else float("nan") for key in keys], width, label=name)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))], keys)
        ax.set_title("Agreement / correlation with the teacher (section 6)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "distribution.png", dpi=120)
        plt.close(fig)

    runs = sorted((p, f) for name, f in zip(names, flat) if (p := (focus_params or {}).get(name)) and "rep-3" in f)
    if len(runs) >= 2:
        fig, ax = plt.subplots(figsize=(7, 4))
        labels = [f"β={b:g}\nγ={g:g}" for (b, g), _ in runs]
        for n in REP_NS:
            ax.plot(labels, [f[f"rep-{n}"] for _, f in runs], "-o", label=f"n={n}")
        ax.set_ylabel("rep-n (%)")
        ax.set_title("Unique n-gram vs FOCUS β, γ (Figure 3a)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "focus_beta_gamma.png", dpi=120)
        plt.close(fig)
    return None


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``axolotl-focus eval`` (every one maps to an :class:`EvalConfig` field)."""
    d = EvalConfig()
    parser.add_argument("models", nargs="+", metavar="MODEL", help="model path or NAME=PATH (any number)")
    a = parser.add_argument
    a("--output-dir", default=d.output_dir, help="results, generations and plots")
    a("--tasks", nargs="+", choices=TASKS, default=list(d.tasks), help="open-ended WikiText continuation and/or "
      "instruction following")
    a("--metrics", nargs="+", choices=METRICS, default=list(d.metrics), help="metric families to compute")
    a("--skip", nargs="+", choices=METRICS, default=[], help="metrics to leave out")
    a("--decodings", nargs="+", choices=DECODINGS, default=list(d.decodings), help="top-p sampling and/or greedy")
    a("--seeds", nargs="+", type=int, default=list(d.seeds), help="top-p generation seeds")
    a("--top-p", type=float, default=d.top_p, help="nucleus of top-p sampling")
    a("--temperature", type=float, default=d.temperature, help="sampling temperature of top-p decoding")
    a("--batch-size", type=int, default=d.batch_size, help="prompts per generation batch")
    a("--threshold", type=float, default=d.threshold, help="CREP coverage threshold")
    g = parser.add_argument_group("open-ended generation")
    g.add_argument("--documents", help="local text/JSONL file or hub dataset id (default: Salesforce/wikitext "
                   "wikitext-103-raw-v1 test from the hub; offline: the embedded WikiText-2 test slice; `embedded`: "
                   "that slice always)")
    g.add_argument("--documents-config", help="hub dataset configuration of --documents")
    g.add_argument("--documents-split", default=d.documents_split, help="hub split of --documents")
    g.add_argument("--text-field", help="JSONL/hub field holding the text (default: text / prompt / instruction)")
    g.add_argument("--num-documents", type=int, default=d.num_documents, help="documents to continue (seeded sample)")
    g.add_argument("--data-seed", type=int, default=d.data_seed, help="seed of the document sample")
    g.add_argument("--prefix-tokens", type=int, default=d.prefix_tokens, help="prompt = the first N tokens of a document")
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="continuation length (paper Table 3: 100)")
    g = parser.add_argument_group("instruction-based generation")
    g.add_argument("--instructions", help="Self-Instruct style JSONL or hub dataset id "
                   "(default: the embedded 252 user-oriented Self-Instruct instructions)")
    g.add_argument("--instructions-config", help="hub dataset configuration of --instructions")
    g.add_argument("--instructions-split", default=d.instructions_split, help="hub split of --instructions")
    g.add_argument("--num-instructions", type=int, default=d.num_instructions, help="instructions to answer (at most)")
    g.add_argument("--instruction-max-new-tokens", type=int, default=d.instruction_max_new_tokens,
                   help="answer length")
    g.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=d.chat_template,
                   help="render instructions with the tokenizer's chat template when it has one")
    g = parser.add_argument_group("perplexity")
    g.add_argument("--ppl-data", help="text/JSONL file, hub dataset id or `embedded` (default: as --documents)")
    g.add_argument("--ppl-config", help="hub dataset configuration of --ppl-data")
    g.add_argument("--ppl-split", default=d.ppl_split, help="hub split of --ppl-data")
    g.add_argument("--ppl-text-field", default=d.ppl_text_field, help="field holding the text")
    g.add_argument("--ppl-window", type=int, default=d.ppl_window, help="tokens per window (capped by the model's context)")
    g.add_argument("--ppl-stride", type=int, default=d.ppl_stride, help="sliding-window stride")
    g.add_argument("--ppl-max-tokens", type=int, help="score at most N tokens (default: all)")
    g = parser.add_argument_group("MAUVE / BERTScore / zero-shot")
    g.add_argument("--mauve-featurizer", default=d.mauve_featurizer, help="local path or hub id")
    g.add_argument("--mauve-seeds", nargs="+", type=int, default=list(d.mauve_seeds), help="MAUVE k-means seeds (mean +- std)")
    g.add_argument("--mauve-max-text-length", type=int, default=d.mauve_max_text_length,
                   help="featurizer tokens per text")
    g.add_argument("--mauve-scaling-factor", type=float, default=d.mauve_scaling_factor, help="MAUVE's c")
    g.add_argument("--bertscore-model", default=d.bertscore_model, help="local path or hub id")
    g.add_argument("--bertscore-layer", type=int, help="hidden layer (default: bert-score's table for the model)")
    g.add_argument("--bertscore-rescale", action=argparse.BooleanOptionalAction, default=d.bertscore_rescale,
                   help="rescale with the baseline")
    g.add_argument("--bertscore-baseline", help="baseline .tsv for rescaling a local model")
    g.add_argument("--zero-shot-tasks", nargs="+", default=list(d.zero_shot_tasks), help="lm-evaluation-harness tasks")
    g.add_argument("--zero-shot-batch-size", default=d.zero_shot_batch_size, help="lm-eval batch size or auto")
    g.add_argument("--zero-shot-limit", type=float, help="examples per task (a fraction if < 1; default: all)")
    g.add_argument("--zero-shot-include", help="folder of extra lm-eval task YAMLs (e.g. offline copies)")
    g = parser.add_argument_group("distribution study and plots")
    g.add_argument("--teacher", help="unpruned teacher (default: the first model's recorded focus_source_model)")
    g.add_argument("--distribution-samples", type=int, default=d.distribution_samples,
                   help="positions sampled for the teacher-probability study")
    g.add_argument("--head-top-p", type=float, default=d.head_top_p, help="nucleus defining the head tokens")
    g.add_argument("--plots", action=argparse.BooleanOptionalAction, default=d.plots, help="write the plots")
    g.add_argument("--focus-params", nargs="+", default=[], metavar="NAME=BETA,GAMMA",
                   help="FOCUS beta/gamma per model for the beta/gamma plot (else read from the name)")
    g.add_argument("--focus-toy", nargs="+", default=[f"{b:g},{c:g}" for b, c in d.focus_toy], metavar="BETA,GAMMA",
                   help="(beta, gamma) curves of the weight-function plot")
    g = parser.add_argument_group("run control")
    g.add_argument("--metrics-only", action="store_true", help="never generate nor load a model: saved files only")
    g.add_argument("--regenerate", action="store_true", help="ignore saved generations and caches")
    g.add_argument("--device", help="one process only (several: each rank uses its own device)")
    g.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "float16"], help="weights dtype")
    g.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")


def _pair(text: str) -> tuple[float, float]:
    beta, _, gamma = text.partition(",")
    return float(beta), float(gamma or 1.0)


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """An :class:`EvalConfig` from parsed :func:`add_eval_arguments` options."""
    names = {f.name for f in fields(EvalConfig)}
    kw = {k: v for k, v in vars(args).items() if k in names and v is not None}
    for key in ("tasks", "decodings", "seeds", "mauve_seeds", "zero_shot_tasks"):
        if key in kw:
            kw[key] = tuple(kw[key])
    kw["metrics"] = tuple(m for m in kw.get("metrics", METRICS) if m not in (args.skip or []))
    kw["focus_params"] = {n: _pair(v) for n, _, v in (s.partition("=") for s in args.focus_params or [])}
    kw["focus_toy"] = tuple(_pair(s) for s in args.focus_toy) if args.focus_toy else EvalConfig().focus_toy
    return EvalConfig(**kw)


def run_eval_cli(args: argparse.Namespace) -> int:
    """Entry point of ``axolotl-focus eval``: evaluate, print the Markdown report; 2 on bad options."""
    main = _ranks().rank == 0  # several processes: only rank 0 logs progress and prints the report
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_args(args).validate()
        specs = _model_specs(args.models)
    except (ValueError, TypeError) as err:
        print(f"axolotl-focus eval: {err}", file=sys.stderr)
        return 2
    missing = [p for _, p in specs if looks_local(p) and not os.path.isdir(p)]
    if missing:
        print(f"axolotl-focus eval: model directory not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    evaluate_models(dict(specs), cfg)
    if not main:
        return 0
    report = Path(cfg.output_dir) / "results.md"
    print(report.read_text(encoding="utf-8"))
    print(f"results: {cfg.output_dir}/<model>/results.json, {report}"
          + (f", {cfg.output_dir}/plots/" if cfg.plots else ""))
    return 0
