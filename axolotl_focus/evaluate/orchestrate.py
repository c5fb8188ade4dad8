"""Evaluation of one model (:func:`evaluate_model`) and of several (:func:`evaluate_models`): every
configured metric in turn, reusing the saved generations and cached numbers
(:mod:`axolotl_focus.evaluate.files`). Then per model ``results.json``; across models
``results.md`` and ``plots/*.png``.

A metric whose package, model or data is missing is reported under ``unavailable`` with what to
install or pass; the other metrics still run.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Sequence

from ..config import source_model_of
from ..files import digest
from .config import EvalConfig, MetricUnavailable, require
from .data import (
    default_wikitext,
    embedded_instructions,
    instruction_items,
    load_documents,
    load_instructions,
    open_ended_items,
    ppl_source,
)
from .distribution import distribution_study, teacher_examples
from .files import cached, jsonable, write_json
from .focus import focus_params_of
from .generation import decoding_key, generate_items, generation_metrics, mean_dicts, saved_generations
from .models import LazyModel, eval_device, load_model
from .plots import make_plots
from .ppl import perplexity
from .report import markdown_report
from .runner import get_ranks
from .similarity import BertScorer, Featurizer, mauve_score

LOG = logging.getLogger(__name__)


def _versions() -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for pkg in ("axolotl-focus", "torch", "transformers", "datasets", "tokenizers", "numpy", "mauve-text",
                "bert-score", "lm-eval", "faiss-cpu", "scikit-learn", "matplotlib"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


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


def model_dir(cfg: EvalConfig, name: str) -> Path:
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
    meta = {"teacher": cfg.teacher, "prompts": digest([it["prompt_tokens"] for it in items]), "seed": seed,
            "top_p": cfg.top_p, "temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens,
            "batch_size": cfg.batch_size}
    return saved_generations(path, meta, lambda: generate_items(
        shared.get("teacher", lambda: LazyModel(cfg.teacher, cfg)).model, tokenizer, items, cfg.max_new_tokens,
        do_sample=True, seed=seed, top_p=cfg.top_p, temperature=cfg.temperature, batch_size=cfg.batch_size,
        desc="teacher samples", progress=cfg.progress, paths=(cfg.teacher, tokenizer_path)), cfg)


@dataclass
class _ModelRun:
    """One model's evaluation under way: what the steps of :func:`evaluate_model` share. Each
    step adds its part to ``res`` (the results), or its reason under ``res["unavailable"]``."""

    name: str
    path: str
    cfg: EvalConfig
    shared: _Shared
    tokenizer: Any
    mdir: Path
    lazy: LazyModel
    res: dict

    @property
    def metrics(self) -> set[str]:
        return set(self.cfg.metrics)

    def perplexity(self) -> None:
        cfg, res, lazy = self.cfg, self.res, self.lazy
        text, res["data"]["ppl"] = ppl_source(cfg, self.shared.default_data)
        meta = {"path": self.path, "data": res["data"]["ppl"]["source"], "config": cfg.ppl_config,
                "split": cfg.ppl_split, "window": cfg.ppl_window, "stride": cfg.ppl_stride, "max": cfg.ppl_max_tokens}
        try:
            res["perplexity"] = cached(self.mdir / "perplexity.json", meta, lambda: perplexity(
                lazy.model, self.tokenizer, text(), cfg.ppl_window, cfg.ppl_stride, cfg.ppl_max_tokens,
                cfg.progress) | {"data": meta["data"]}, cfg, "perplexity")
        except MetricUnavailable as err:
            _unavailable(res, "ppl", err)

    def items(self, task: str) -> tuple[list[dict], int]:
        """The prompts of ``task`` and their token budget (where they came from: ``res["data"]``)."""
        cfg, res = self.cfg, self.res
        if task == "open_ended":
            docs, res["data"]["open_ended"] = load_documents(cfg, self.shared.default_data)
            items = open_ended_items(self.tokenizer, docs, cfg.prefix_tokens, cfg.max_new_tokens,
                                     cfg.num_documents, cfg.data_seed)
            if len(items) < cfg.num_documents:
                res["notes"].append(f"open_ended: {len(items)} documents have >= {cfg.prefix_tokens} + "
                                    f"{cfg.max_new_tokens} tokens (asked for {cfg.num_documents})")
            return items, cfg.max_new_tokens
        rows = load_instructions(cfg.instructions or embedded_instructions(), config=cfg.instructions_config,
                                 split=cfg.instructions_split, limit=cfg.num_instructions)
        res["data"]["instruction"] = {"source": cfg.instructions or "embedded:self-instruct/user_oriented",
                                      "config": cfg.instructions_config, "split": cfg.instructions_split}
        return instruction_items(self.tokenizer, rows, cfg.chat_template), cfg.instruction_max_new_tokens

    def task(self, task: str) -> list[dict]:
        """``res[task]``: the generations' metrics under every decoding and seed; returns the prompts."""
        cfg = self.cfg
        items, budget = self.items(task)
        if not items:
            self.res["unavailable"][task] = f"{task}: no prompts (open-ended needs documents of >= prefix + new tokens)"
            return items
        block: dict[str, Any] = {"prompts": len(items), "max_new_tokens": budget, "decodings": {}}
        if task == "open_ended":
            block["prefix_tokens"] = cfg.prefix_tokens
            block["reference"] = generation_metrics(
                [{"tokens": it["reference_tokens"], "stop": "budget"} for it in items], len(self.tokenizer), budget,
                cfg.threshold)
        prompts_digest = digest([(it["id"], it["prompt_tokens"]) for it in items])
        for decoding in cfg.decodings:
            key = decoding_key(decoding, cfg.top_p)
            per_seed = {}
            for seed in (cfg.seeds if decoding == "top_p" else [None]):
                m = self.decoding(task, items, budget, key, seed, prompts_digest)
                if m is not None:
                    per_seed["greedy" if seed is None else str(seed)] = m
            if per_seed:
                block["decodings"][key] = {"seeds": per_seed, "mean": mean_dicts(list(per_seed.values()))}
        self.res[task] = block
        return items

    def decoding(self, task: str, items: list[dict], budget: int, key: str, seed: int | None,
                 prompts_digest: str) -> dict | None:
        """The metrics of one decoding (``seed`` None: greedy); None when its generations are unavailable."""
        cfg, metrics = self.cfg, self.metrics
        label = key if seed is None else f"{key}.seed{seed}"
        meta = {"path": self.path, "task": task, "decoding": key, "seed": seed, "max_new_tokens": budget,
                "temperature": cfg.temperature if seed is not None else None, "prompts": prompts_digest,
                "batch_size": cfg.batch_size}
        try:
            rows = saved_generations(self.mdir / "generations" / f"{task}.{label}.jsonl", meta, lambda: generate_items(
                self.lazy.model, self.tokenizer, items, budget, do_sample=seed is not None, seed=seed or 0,
                top_p=cfg.top_p, temperature=cfg.temperature, batch_size=cfg.batch_size,
                desc=f"{self.name} {task} {label}", progress=cfg.progress, paths=(self.path, self.path)), cfg)
        except MetricUnavailable as err:
            _unavailable(self.res, f"{task}.{label}", err)
            return None
        m = generation_metrics(rows, len(self.tokenizer), budget, cfg.threshold) if metrics & {
            "repetition", "serving"} else {}
        if "mauve" in metrics and task == "open_ended":
            m |= self.mauve(rows)
        if "bertscore" in metrics and task == "instruction":
            m |= self.bertscore(rows)
        return m

    def mauve(self, rows: list[dict]) -> dict:
        cfg = self.cfg
        try:
            feat = self.shared.get("featurizer", lambda: (require("mauve", "mauve-text", "MAUVE"), Featurizer(
                cfg.mauve_featurizer, eval_device(cfg), cfg.mauve_max_text_length))[1])
            return mauve_score([r["reference"] for r in rows], [r["text"] for r in rows], feat, cfg.mauve_seeds,
                               cfg.mauve_scaling_factor)
        except MetricUnavailable as err:
            _unavailable(self.res, "mauve", err)
            return {}

    def bertscore(self, rows: list[dict]) -> dict:
        cfg = self.cfg
        pairs = [(r["text"], r["reference"]) for r in rows if r["reference"].strip()]
        try:
            scorer = self.shared.get("bertscorer", lambda: BertScorer(cfg, eval_device(cfg)))
            out = {"bertscore": scorer(*map(list, zip(*pairs)))} if pairs else {}
            self.res["bertscore_settings"] = scorer.info
            return out
        except MetricUnavailable as err:
            _unavailable(self.res, "bertscore", err)
            return {}

    def distribution(self, open_items: list[dict]) -> None:
        cfg, path, shared = self.cfg, self.path, self.shared
        try:
            if "open_ended" not in cfg.tasks:
                raise MetricUnavailable("distribution study: needs the open_ended task (its prompts)")
            if not cfg.teacher:
                raise MetricUnavailable("distribution study: pass --teacher PATH (the unpruned model)")
            if os.path.abspath(cfg.teacher) == os.path.abspath(path):
                raise MetricUnavailable("distribution study: this model is the teacher")
            samples = _teacher_samples(cfg, shared, self.tokenizer, open_items, path)
            meta = {"teacher": cfg.teacher, "student": path, "samples": digest([s["tokens"] for s in samples]),
                    "top_p": cfg.head_top_p}

            def study():
                teacher = shared.get("teacher", lambda: LazyModel(cfg.teacher, cfg)).model
                out = distribution_study(teacher, self.lazy.model, samples, cfg.head_top_p, cfg.batch_size,
                                         progress=cfg.progress)
                return out | {"teacher": cfg.teacher, "teacher_examples": teacher_examples(teacher, samples)}

            self.res["distribution"] = cached(self.mdir / "distribution.json", meta, study, cfg, "distribution study")
        except MetricUnavailable as err:
            _unavailable(self.res, "distribution", err)

    def zero_shot(self) -> None:
        cfg, path = self.cfg, self.path
        self.lazy.release()
        meta = {"path": path, "tasks": list(cfg.zero_shot_tasks), "limit": cfg.zero_shot_limit,
                "include": cfg.zero_shot_include}
        try:
            self.res["zero_shot"] = cached(self.mdir / "zero_shot.json", meta, lambda: get_ranks().zero_shot(
                path=path, tasks=cfg.zero_shot_tasks, device=str(eval_device(cfg)), batch_size=cfg.zero_shot_batch_size,
                dtype=cfg.dtype, limit=cfg.zero_shot_limit, trust_remote_code=cfg.trust_remote_code,
                include_path=cfg.zero_shot_include), cfg, "zero-shot")
        except MetricUnavailable as err:
            _unavailable(self.res, "zero_shot", err)


def evaluate_model(name: str, path: str, cfg: EvalConfig, shared: _Shared | None = None) -> dict:
    """Every configured metric for one model; writes ``<output_dir>/<name>/results.json``.
    Under several processes call :func:`evaluate_models` instead (on every rank)."""
    from transformers import AutoTokenizer  # heavy: only once a model is evaluated

    shared = shared or _Shared(cfg)
    mdir = model_dir(cfg, name)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    lazy = LazyModel(path, cfg)
    vocab = len(tokenizer)
    res: dict[str, Any] = {
        "model": name, "path": path, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": _versions(),
        "settings": jsonable({k: v for k, v in asdict(cfg).items() if k not in ("progress", "focus_params")}),
        "ead_vocab_size": vocab, "processes": get_ranks().size, "data": {}, "unavailable": {}, "notes": [],
    }
    run = _ModelRun(name, path, cfg, shared, tokenizer, mdir, lazy, res)
    if "ppl" in run.metrics:
        run.perplexity()
    open_items: list[dict] = []
    for task in cfg.tasks:
        items = run.task(task)
        if task == "open_ended":
            open_items = items
    if "distribution" in run.metrics:
        run.distribution(open_items)
    if "zero_shot" in run.metrics:
        run.zero_shot()
    lazy.release()
    write_json(mdir / "results.json", res)
    return res


def model_specs(models) -> list[tuple[str, str]]:
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
    share of every batch of prompts for it and return ``[]`` (see :class:`~axolotl_focus.evaluate.runner.Ranks`)."""
    cfg = replace(cfg).validate()
    specs = model_specs(models)
    ranks = get_ranks()
    if ranks.size > 1:
        if ranks.rank != 0:
            ranks.serve(cfg, load_model)
            return []
        if cfg.device:
            LOG.warning("--device %s ignored: %d processes, each on its own device", cfg.device, ranks.size)
        LOG.info("%d processes: generation batches are shared out; rank 0 computes the metrics and writes the "
                 "files", ranks.size)
    if not cfg.teacher and "distribution" in cfg.metrics:
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
