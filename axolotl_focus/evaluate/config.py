"""Settings of an evaluation run (:class:`EvalConfig`), the names of its tasks, metrics and
decodings, and :class:`MetricUnavailable`, raised when a metric cannot run here."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..degeneration import DEFAULT_THRESHOLD
from ..options import nonfinite_fields, opt

EXTRA = "pip install 'axolotl-focus[eval]'"
TASKS = ("open_ended", "instruction")
METRICS = ("ppl", "repetition", "serving", "mauve", "bertscore", "zero_shot", "distribution")
DECODINGS = ("top_p", "greedy")
ZERO_SHOT_AVERAGE = ("arc_challenge", "piqa", "boolq", "openbookqa", "hellaswag", "winogrande")
ZERO_SHOT_TASKS = ZERO_SHOT_AVERAGE + ("truthfulqa_mc2",)
ZERO_SHOT_METRIC = {"arc_challenge": "acc_norm", "hellaswag": "acc_norm", "openbookqa": "acc_norm"}
REP_NS = (3, 4, 5, 6)
# option groups of `axolotl-focus eval --help`
_OPEN_ENDED, _INSTRUCTION, _PPL = "open-ended generation", "instruction-based generation", "perplexity"
_SIMILARITY, _DISTRIBUTION, _RUN = "MAUVE / BERTScore / zero-shot", "distribution study and plots", "run control"


class MetricUnavailable(RuntimeError):
    """A metric cannot run here (missing extra, model or data); the message says what to do."""


@dataclass
class EvalConfig:
    """Settings of an evaluation run (defaults: the paper's where it states them); each field's help
    is its ``axolotl-focus eval --help`` text (:mod:`axolotl_focus.options`)."""

    output_dir: str = opt("eval_results", "results, generations and plots")
    tasks: tuple[str, ...] = opt(TASKS, "open-ended WikiText continuation and/or instruction following", choices=TASKS)
    metrics: tuple[str, ...] = opt(METRICS, "metric families to compute", choices=METRICS)
    decodings: tuple[str, ...] = opt(DECODINGS, "top-p sampling and/or greedy", choices=DECODINGS)
    seeds: tuple[int, ...] = opt((0,), "top-p generation seeds")
    top_p: float = opt(0.9, "nucleus of top-p sampling")
    temperature: float = opt(1.0, "sampling temperature of top-p decoding")
    batch_size: int = opt(16, "prompts per generation batch")
    threshold: float = opt(DEFAULT_THRESHOLD, "CREP coverage threshold")
    documents: str | None = opt(None, "local text/JSONL file or hub dataset id (default: Salesforce/wikitext "
                                "wikitext-103-raw-v1 test from the hub; offline: the embedded WikiText-2 test slice; "
                                "`embedded`: that slice always)", group=_OPEN_ENDED)
    documents_config: str | None = opt(None, "hub dataset configuration of --documents", group=_OPEN_ENDED)
    documents_split: str = opt("test", "hub split of --documents", group=_OPEN_ENDED)
    text_field: str | None = opt(None, "JSONL/hub field holding the text (default: text / prompt / instruction)",
                                 group=_OPEN_ENDED)
    num_documents: int = opt(1000, "documents to continue (seeded sample)", group=_OPEN_ENDED)
    data_seed: int = opt(0, "seed of the document sample", group=_OPEN_ENDED)
    prefix_tokens: int = opt(50, "prompt = the first N tokens of a document", group=_OPEN_ENDED)
    max_new_tokens: int = opt(100, "continuation length (paper Table 3: 100; Table 1: 200)", group=_OPEN_ENDED)
    instructions: str | None = opt(None, "Self-Instruct style JSONL or hub dataset id (default: the embedded 252 "
                                   "user-oriented Self-Instruct instructions)", group=_INSTRUCTION)
    instructions_config: str | None = opt(None, "hub dataset configuration of --instructions", group=_INSTRUCTION)
    instructions_split: str = opt("train", "hub split of --instructions", group=_INSTRUCTION)
    num_instructions: int = opt(1000, "instructions to answer (at most)", group=_INSTRUCTION)
    instruction_max_new_tokens: int = opt(256, "answer length", group=_INSTRUCTION)
    chat_template: bool = opt(True, "render instructions with the tokenizer's chat template when it has one",
                              group=_INSTRUCTION)
    ppl_data: str | None = opt(None, "text/JSONL file, hub dataset id or `embedded` (default: as --documents: "
                               "WikiText-103 test; offline: the embedded WikiText-2 test)", group=_PPL)
    ppl_config: str | None = opt(None, "hub dataset configuration of --ppl-data", group=_PPL)
    ppl_split: str = opt("test", "hub split of --ppl-data", group=_PPL)
    ppl_text_field: str = opt("text", "field holding the text", group=_PPL)
    ppl_window: int = opt(1024, "tokens per window (capped by the model's max_position_embeddings)", group=_PPL)
    ppl_stride: int = opt(512, "sliding-window stride", group=_PPL)
    ppl_max_tokens: int | None = opt(None, "score at most N tokens (default: all)", group=_PPL)
    mauve_featurizer: str = opt("gpt2-large", "local path or hub id", group=_SIMILARITY)
    mauve_seeds: tuple[int, ...] = opt((1, 2, 3, 4, 5), "MAUVE k-means seeds (mean +- std)", group=_SIMILARITY)
    mauve_max_text_length: int = opt(1024, "featurizer tokens per text", group=_SIMILARITY)
    mauve_scaling_factor: float = opt(5.0, "MAUVE's c", group=_SIMILARITY)
    bertscore_model: str = opt("roberta-large", "local path or hub id", group=_SIMILARITY)
    bertscore_layer: int | None = opt(None, "hidden layer (default: bert-score's table for the model; "
                                      "roberta-large: 17)", group=_SIMILARITY)
    bertscore_rescale: bool = opt(True, "rescale with the baseline", group=_SIMILARITY)
    bertscore_baseline: str | None = opt(None, "baseline .tsv for rescaling a local model (default: bert-score's "
                                         "for the model name)", group=_SIMILARITY)
    zero_shot_tasks: tuple[str, ...] = opt(ZERO_SHOT_TASKS, "lm-evaluation-harness tasks", group=_SIMILARITY)
    zero_shot_batch_size: str = opt("auto", "lm-eval batch size or auto", group=_SIMILARITY)
    zero_shot_limit: float | None = opt(None, "examples per task (a fraction if < 1; default: all)", group=_SIMILARITY)
    zero_shot_include: str | None = opt(None, "folder of extra lm-eval task YAMLs (e.g. offline copies of local "
                                        "datasets)", group=_SIMILARITY)
    teacher: str | None = opt(None, "unpruned teacher (default: the first model's recorded focus_source_model)",
                              group=_DISTRIBUTION)
    distribution_samples: int = opt(200, "positions sampled for the teacher-probability study", group=_DISTRIBUTION)
    head_top_p: float = opt(0.9, "nucleus defining the head tokens", group=_DISTRIBUTION)
    plots: bool = opt(True, "write the plots", group=_DISTRIBUTION)
    focus_params: dict[str, tuple[float, float]] = opt(
        default_factory=dict, help="FOCUS beta/gamma per model for the beta/gamma plot (else read from the name)",
        group=_DISTRIBUTION, type=str, nargs="+", metavar="NAME=BETA,GAMMA")
    focus_toy: tuple[tuple[float, float], ...] = opt(((5.0, 1.0), (15.0, 1.0), (15.0, 3.0)),
                                                    "(beta, gamma) curves of the weight-function plot",
                                                    group=_DISTRIBUTION, type=str, metavar="BETA,GAMMA")
    metrics_only: bool = opt(False, "never generate nor load a model: saved files only", group=_RUN)
    regenerate: bool = opt(False, "ignore saved generations and caches", group=_RUN)
    device: str | None = opt(None, "one process only (several: each rank uses its own device)", group=_RUN)
    dtype: str = opt("auto", "weights dtype", group=_RUN, choices=("auto", "float32", "bfloat16", "float16"))
    trust_remote_code: bool = opt(False, "allow model code from the checkpoint", group=_RUN)
    progress: bool = opt(True, "progress bars", group=_RUN)

    def validate(self) -> "EvalConfig":
        """Raise one ``ValueError`` naming every bad field."""
        errors = nonfinite_fields(self)

        def bad(name, msg):
            if not any(e.startswith(f"{name}: ") for e in errors):
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
        for name in ("mauve_max_text_length", "ppl_max_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                bad(name, "must be an integer > 0")
        for name in ("top_p", "head_top_p"):
            if not 0 < getattr(self, name) <= 1:
                bad(name, "must be in (0, 1]")
        for name in ("temperature", "mauve_scaling_factor"):
            if not getattr(self, name) > 0:
                bad(name, "must be > 0")
        if self.zero_shot_limit is not None and not self.zero_shot_limit > 0:
            bad("zero_shot_limit", "must be > 0 (a fraction of each task if < 1, else a number of examples)")
        if len(set(self.seeds)) != len(self.seeds):
            bad("seeds", "lists a seed twice")
        if not 0 < self.threshold < 1:
            bad("threshold", "must be in (0, 1)")
        if "top_p" in self.decodings and not self.seeds:
            bad("seeds", "top-p decoding needs at least one seed")
        if self.metrics_only and self.regenerate:
            bad("regenerate", "contradicts metrics_only")
        if errors:
            raise ValueError("; ".join(errors))
        return self


def require(module: str, package: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MetricUnavailable(f"{what} needs the `{package}` package ({err}): {EXTRA}") from None
