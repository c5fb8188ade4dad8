"""Settings of an evaluation run (:class:`EvalConfig`), the names of its tasks, metrics and
decodings, and :class:`MetricUnavailable`, raised when a metric cannot run here."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..degeneration import DEFAULT_THRESHOLD

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


def require(module: str, package: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MetricUnavailable(f"{what} needs the `{package}` package ({err}): {EXTRA}") from None
