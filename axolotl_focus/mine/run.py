"""RePAIR pair mining (paper section 4.2.1 and appendix B): degenerate negatives from the pruned
student, non-degenerate positives from the unpruned teacher, both continuing the same prefix.

Procedure, per prompt
---------------------
1. Prompt. Open-ended mode: the first ``prefix_tokens`` (paper: 50) tokens of the document,
   decoded and re-encoded with the tokenizer's special tokens (BOS), so that the prompt text and
   the prompt ids agree. Instruction mode: the whole prompt (``instruction`` + ``"\\n\\n"`` +
   ``input`` when present), rendered with the tokenizer's chat template when it has one and
   ``chat_template`` is on.
2. Negative. The student samples a continuation ``y_hat`` (top-p, temperature, at most
   ``max_new_tokens``; a row ends at EOS, which is not part of ``y_hat``). With ``early_stop`` a
   :class:`~axolotl_focus.degeneration.LoopDetector` per row stops the row as soon as the loop
   is confirmed (which implies ``coverage(y_hat) >= threshold``); the metrics below are computed
   on what was generated. In a batch a row that stopped (loop, EOS or budget) leaves the batch:
   the later forward passes compute only the live rows (``student_row_steps`` in the summary,
   vs ``student_row_steps_padded`` = rows x steps, the cost with stopped rows kept as padding;
   ``tokens_not_generated`` counts the early-stopped rows' unused budget, ``student_steps_skipped``
   the decoding steps no row of its batch needed). The prompt is degenerate when
   ``coverage(y_hat) >= threshold``: the coverage domain is the generated continuation only (the
   paper's model output ``y_hat``), never the prompt. ``onset`` = index in ``y_hat`` where the
   second copy of the repeated segment starts; the shared prefix is ``prompt + y_hat[:onset]``
   (the text before the loop plus one full copy of the segment) and the rejected continuation is
   ``y_hat[onset:]``.
3. Positive. The teacher continues ``prompt + y_hat[:onset]`` with the same top-p at
   ``teacher_temperature`` (default: ``temperature``; a small student may loop only at a low
   temperature, where the teacher loops too, so the positive can be sampled at e.g. 1.0), at most
   ``len(rejected)`` new tokens (or ``chosen_max_new_tokens``). It is kept if non-empty and
   ``coverage(chosen) < threshold`` (coverage of the chosen tokens only); otherwise it is
   re-sampled with a new seed, up to ``positive_attempts`` tries in all; then the pair is dropped.

Before the teacher runs, a negative is also dropped when its rejected text is blank, or (with
``require_rejected_degenerate``, the default; the paper only checks ``y_hat``) when
``coverage(rejected) < threshold``: the rejected part must be a loop on its own, i.e. hold at
least two copies of the segment. ``y_hat`` with exactly two copies (prefix = junk + copy 1,
rejected = copy 2 + a partial copy) passes the paper's test but not this one; a row stopped
early (3 clean copies by default) normally keeps 2 copies in rejected and passes.

Generation is batched (``batch_size`` prompts) by :func:`generate_batch`, our own KV-cache
decoding loop with LEFT padding built by hand (the shared tokenizer's ``padding_side`` is never
touched); per-row EOS, budgets and loop detection run in one ``RowStopper``, and rows that
ended are removed from the batch (and its KV cache). Sampling is pure top-p (``top_k=0``; the
models' own generation defaults such as a repetition penalty play no part). Seeds: every row
draws from its own ``torch.Generator``; the student's sample of a prompt is seeded by
``(seed, source_id)`` and the teacher's ``attempt``-th positive by ``(seed, source_id, attempt)``
(:func:`student_row_seed`, :func:`teacher_row_seed`), never by the batch, so a pair does not
depend on which prompts share its batch, on ``batch_size``, on the number of processes, or on a
resume (up to float rounding of the forward pass under different padding). The global torch RNG
is not used.

The pairs file (its rows, the text boundary, the state, summary and run-record files, resume and
restart): :mod:`axolotl_focus.mine.pairs_file`. The settings: :class:`~axolotl_focus.mine.config.MiningConfig`.

Several processes (``accelerate launch``): the remaining prompts are split with
``PartialState().split_between_processes``; rank ``i`` writes ``<output stem>.rank{i}.jsonl``
(and its ``.state``) and rank 0 merges the shards into ``output`` at the end (deduplicated by
source id, capped at the target) and deletes them. Leftover shards of a crashed run are merged
when the next run starts.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..degeneration import coverage
from ..files import write_json
from ..generation import continuation_text, generate_batch, process_state, row_seed
from ..options import resolve_device
from ..prompt_format import encode_prompt
from ..sources import Prompt, load_prompts
from ..vocabulary import check_vocab_compat
from .config import MiningConfig, MiningSummary
from .pairs_file import (
    append_rows,
    discard_new_record,
    merge_shards,
    output_lock,
    prepare_output,
    read_rows,
    repair_tail,
    shard_path,
    state_path,
)

LOG = logging.getLogger(__name__)

__all__ = ["mine_pairs", "run_mining", "student_row_seed", "teacher_row_seed"]


def _as_prompts(prompts: Sequence[Prompt | str]) -> list[Prompt]:
    return [p if isinstance(p, Prompt) else Prompt(str(i), p) for i, p in enumerate(prompts)]


def _model_name(model, given: str | None) -> str:
    return given or getattr(model, "name_or_path", "") or type(model).__name__


@dataclass
class _Negative:
    """A degenerate student continuation and, once found, the teacher's positive for it."""

    prompt: Prompt
    text: str  # prompt text (as rendered)
    ids: list[int]  # prompt ids
    out: list[int]  # the student's continuation y_hat
    stop: str  # why the student row ended: loop / budget / eos
    onset: int
    coverage: float  # of y_hat
    rejected_coverage: float
    rejected_text: str
    chosen: tuple[list[int], str, float, int] | None = None  # tokens, text, coverage, attempt

    @property
    def context(self) -> list[int]:
        return self.ids + self.out[: self.onset]

    @property
    def rejected(self) -> list[int]:
        return self.out[self.onset :]


def student_row_seed(source_id: str) -> int:
    """Row seed of the student's sample of a prompt (with ``cfg.seed``: see :func:`generate_batch`)."""
    return row_seed("student", source_id)


def teacher_row_seed(source_id: str, attempt: int) -> int:
    """Row seed of the teacher's ``attempt``-th positive for a prompt (0-based)."""
    return row_seed("teacher", source_id, attempt)


def _student_pass(student, tokenizer, batch: list[Prompt], cfg: MiningConfig,
                  summary: MiningSummary, states: list[dict]) -> list[_Negative]:
    """Sample the student on a batch; return the usable negatives, record the others in ``states``."""
    encoded = [encode_prompt(tokenizer, p.text, cfg) for p in batch]
    detector = None
    if cfg.early_stop:
        detector = dict(threshold=cfg.threshold, min_tokens=cfg.detector_min_tokens,
                        min_repeats=cfg.detector_min_repeats)
    gen = generate_batch(student, tokenizer, [ids for _, ids in encoded], [cfg.max_new_tokens] * len(batch),
                         seed=cfg.seed, row_seeds=[student_row_seed(p.source_id) for p in batch], top_p=cfg.top_p,
                         temperature=cfg.temperature, detector_kwargs=detector)
    summary.student_batches += 1
    summary.student_steps += gen.steps
    summary.student_steps_skipped += cfg.max_new_tokens - gen.steps
    summary.student_row_steps += gen.row_steps
    summary.student_row_steps_padded += gen.padded_row_steps
    negatives = []
    for prompt, (text, ids), out, stop in zip(batch, encoded, gen.tokens, gen.reason):
        summary.prompts_tried += 1
        summary.student_tokens += len(out)
        if stop == "loop":
            summary.early_stopped += 1
            summary.tokens_not_generated += cfg.max_new_tokens - len(out)
        res = coverage(out, threshold=cfg.threshold)
        if not res.is_degenerate:
            states.append({"source_id": prompt.source_id, "status": "not_degenerate"})
            continue
        summary.degenerate += 1
        rejected = out[res.onset :]
        neg = _Negative(prompt, text, ids, out, stop, res.onset, res.coverage,
                        coverage(rejected, threshold=cfg.threshold).coverage,
                        continuation_text(tokenizer, ids + out[: res.onset], rejected))
        if not neg.rejected_text.strip() or (cfg.require_rejected_degenerate and neg.rejected_coverage < cfg.threshold):
            summary.negatives_dropped += 1
            states.append({"source_id": prompt.source_id, "status": "dropped"})
            continue
        negatives.append(neg)
    return negatives


def _teacher_pass(teacher, tokenizer, negatives: list[_Negative], cfg: MiningConfig, summary: MiningSummary) -> None:
    """Sample positives for ``negatives`` (``neg.chosen``), re-sampling rejected ones with new seeds."""
    for attempt in range(cfg.positive_attempts):
        todo = [n for n in negatives if n.chosen is None]
        if not todo:
            return
        budgets = [cfg.chosen_max_new_tokens or len(n.rejected) for n in todo]
        gen = generate_batch(teacher, tokenizer, [n.context for n in todo], budgets, seed=cfg.seed,
                             row_seeds=[teacher_row_seed(n.prompt.source_id, attempt) for n in todo],
                             top_p=cfg.top_p, temperature=cfg.positive_temperature)
        for neg, toks in zip(todo, gen.tokens):
            summary.teacher_tokens += len(toks)
            text = continuation_text(tokenizer, neg.context, toks)
            cov = coverage(toks, threshold=cfg.threshold)
            if not text.strip():
                summary.positives_rejected_empty += 1
            elif cov.is_degenerate:
                summary.positives_rejected_looping += 1
            else:
                neg.chosen = (toks, text, cov.coverage, attempt)


def _pair_row(neg: _Negative, tokenizer, names: tuple[str, str], cfg: MiningConfig) -> dict:
    """The output row of a negative with its positive (fields: see :mod:`axolotl_focus.mine.pairs_file`)."""
    toks, text, cov_chosen, attempt = neg.chosen
    return {
        "prompt": neg.text + continuation_text(tokenizer, neg.ids, neg.out[: neg.onset]),
        "chosen": text,
        "rejected": neg.rejected_text,
        "source_id": neg.prompt.source_id,
        "onset": neg.onset,
        "coverage_rejected": neg.rejected_coverage,
        "coverage_chosen": cov_chosen,
        "coverage_output": neg.coverage,
        "student": names[0],
        "teacher": names[1],
        "seed": cfg.seed,
        "top_p": cfg.top_p,
        "temperature": cfg.temperature,
        "teacher_temperature": cfg.positive_temperature,
        "chosen_attempt": attempt,
        "student_stop": neg.stop,
        "prompt_tokens": neg.context,
        "rejected_tokens": neg.rejected,
        "chosen_tokens": toks,
    }


def _mine_local(student, teacher, tokenizer, prompts: list[Prompt], cfg: MiningConfig, names: tuple[str, str],
                path: str, target: int, show: bool) -> MiningSummary:
    """Mine ``prompts`` batch by batch into ``path`` (+ its state file) until ``target`` new pairs."""
    summary = MiningSummary(output=path)
    bar = tqdm(total=len(prompts), desc="RePAIR pairs", unit="prompt", disable=not show)
    for b in range(0, len(prompts), cfg.batch_size):
        if summary.pairs_kept >= target:
            break
        batch = prompts[b : b + cfg.batch_size]
        states: list[dict] = []
        negatives = _student_pass(student, tokenizer, batch, cfg, summary, states)
        _teacher_pass(teacher, tokenizer, negatives, cfg, summary)
        rows = []
        for neg in negatives:
            if neg.chosen is None:
                summary.pairs_dropped_no_positive += 1
                states.append({"source_id": neg.prompt.source_id, "status": "no_positive"})
            else:
                rows.append(_pair_row(neg, tokenizer, names, cfg))
        rows = rows[: target - summary.pairs_kept]  # the surplus stays untried
        append_rows(path, rows)  # pairs first: a kill in between only means retrying this batch
        append_rows(state_path(path), states)
        summary.pairs_kept += len(rows)
        bar.update(len(batch))
        bar.set_postfix(degenerate=f"{summary.degenerate_share:.0%}", pairs=summary.pairs_kept)
    bar.close()
    summary.target_reached = summary.pairs_kept >= target
    return summary


def mine_pairs(student, teacher, tokenizer, prompts: Sequence[Prompt | str], cfg: MiningConfig) -> MiningSummary:
    """Mine RePAIR pairs from ``prompts`` into ``cfg.output`` (resumable; see :mod:`axolotl_focus.mine.pairs_file`).

    ``student``/``teacher``: causal LMs sharing ``tokenizer``, already on their devices.
    ``prompts``: :class:`Prompt` objects (or plain strings, whose ids are their indices).
    Under several processes every rank calls this with the same prompts. Returns the summary
    (on rank 0: all ranks' counts), also logged and written to ``<output>.summary.json``.
    An output that is not a pairs file, or that holds rows mined with other settings (models,
    vocabulary size, prompt reading, sampling: :meth:`MiningConfig.run_record`, kept in
    ``<output>.run.json``), raises ``ValueError`` before anything is written, unless
    ``cfg.restart`` (which starts a pairs file over).
    """
    cfg.validate(prompts=False)
    state = process_state()
    with output_lock(cfg.output, state):
        return _mine_pairs(student, teacher, tokenizer, prompts, cfg, state)


def _mine_pairs(student, teacher, tokenizer, prompts, cfg: MiningConfig, state) -> MiningSummary:
    from accelerate.utils import gather_object  # heavy: only a mining run gathers

    start = time.perf_counter()
    output = cfg.output
    names = (_model_name(student, cfg.student),
             _model_name(teacher, cfg.teacher_path() if cfg.student else cfg.teacher))
    prepare_output(cfg, cfg.run_record(*names, _config_vocab(getattr(student, "config", None))), state)
    if state.is_main_process:
        merge_shards(output, cfg.target_pairs)  # leftovers of an interrupted multi-process run
        repair_tail(output)
        repair_tail(state_path(output))
    state.wait_for_everyone()

    prompts = _as_prompts(prompts)
    have = read_rows(output)
    done = {r["source_id"] for r in have} | {r["source_id"] for r in read_rows(state_path(output))}
    todo = [p for p in prompts if p.source_id not in done]
    need = max(0, cfg.target_pairs - len(have))
    show = cfg.progress and state.is_main_process
    for model in (student, teacher):
        model.eval()

    if state.num_processes == 1:
        summary = _mine_local(student, teacher, tokenizer, todo, cfg, names, output, need, show)
    else:
        shard = shard_path(output, state.process_index)
        with state.split_between_processes(todo) as mine:
            summary = _mine_local(student, teacher, tokenizer, list(mine), cfg, names, shard,
                                  math.ceil(need / state.num_processes), show)
        state.wait_for_everyone()
        summaries = gather_object([summary])
        if state.is_main_process:
            merge_shards(output, cfg.target_pairs)
            for other in summaries[1:]:
                summary.merge(other)
        state.wait_for_everyone()

    summary.output = output
    summary.prompts_available = len(prompts)
    summary.prompts_skipped_resume = len(prompts) - len(todo)
    summary.pairs_total = len(read_rows(output))
    summary.target_reached = summary.pairs_total >= cfg.target_pairs
    summary.elapsed_s = round(time.perf_counter() - start, 3)
    summary.settings = cfg.sampling_settings()
    if state.is_main_process:
        write_json(output + ".summary.json", summary.to_dict(), indent=2)
        LOG.info(
            "RePAIR mining: %d prompts tried (%d skipped on resume), %.1f%% degenerate, %d pairs kept "
            "(%d in %s), %d positives rejected for looping, %d pairs dropped; student early stopping: "
            "%d rows stopped, %d budget tokens not generated, %d of %d batched decoding steps skipped, "
            "%d row-steps computed of %d with ended rows kept as padding",
            summary.prompts_tried, summary.prompts_skipped_resume, 100 * summary.degenerate_share,
            summary.pairs_kept, summary.pairs_total, output, summary.positives_rejected_looping,
            summary.pairs_dropped_no_positive + summary.negatives_dropped, summary.early_stopped,
            summary.tokens_not_generated, summary.student_steps_skipped,
            summary.student_batches * cfg.max_new_tokens, summary.student_row_steps,
            summary.student_row_steps_padded,
        )
    return summary


def _config_vocab(config) -> int | None:
    """The vocabulary size a model config records (a composite model's: its text config's); the
    run record's ``vocab_size`` (the student's), read before loading weights and after."""
    if config is None:
        return None
    return getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "vocab_size", None)


def _check_vocab(cfg: MiningConfig, teacher_path: str):
    """Student and teacher must share one vocabulary: compared from their tokenizer files and
    configs only (no weights), with :func:`axolotl_focus.vocabulary.check_vocab_compat`. Returns the
    student's tokenizer and config vocabulary size."""
    paths, kw = (cfg.student, teacher_path), dict(trust_remote_code=cfg.trust_remote_code)
    tokenizers = [AutoTokenizer.from_pretrained(path, **kw) for path in paths]
    sizes = [_config_vocab(AutoConfig.from_pretrained(path, **kw)) for path in paths]
    try:
        check_vocab_compat(*tokenizers, *sizes)
    except ValueError as err:
        found = re.search(r"\((.*)\)\. ", str(err))  # its list of differences
        raise ValueError(f"teacher: {teacher_path}: does not share the student's vocabulary "
                         f"({found.group(1) if found else err}); RePAIR feeds the student's token ids to the "
                         "teacher, so use the model the student was pruned from (same tokenizer)") from None
    if sizes[0] is not None and sizes[0] < len(tokenizers[0]):
        raise ValueError(f"student: {cfg.student}: config vocab_size {sizes[0]} is below its tokenizer's "
                         f"{len(tokenizers[0])} tokens")
    return tokenizers[0], sizes[0]


def _check_context(cfg: MiningConfig, tokenizer, prompts: list[Prompt]) -> None:
    """Every prompt and its budget fit the student's context (its config's
    ``max_position_embeddings``), checked before any weights are loaded: open-ended mode
    ``prefix_tokens + max_new_tokens``, instruction mode each rendered prompt + ``max_new_tokens``
    (one line with the count and the first prompt that does not fit)."""
    config = AutoConfig.from_pretrained(cfg.student, trust_remote_code=cfg.trust_remote_code)
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    if not context:
        return
    if cfg.mode == "open_ended":
        if cfg.prefix_tokens + cfg.max_new_tokens > context:
            raise ValueError(f"max_new_tokens: --prefix-tokens {cfg.prefix_tokens} + --max-new-tokens "
                             f"{cfg.max_new_tokens} exceed the student's context ({context} tokens, "
                             "max_position_embeddings)")
        return
    long = [(p, n) for p in prompts if (n := len(encode_prompt(tokenizer, p.text, cfg)[1])) + cfg.max_new_tokens
            > context]
    if long:
        (first, n) = long[0]
        raise ValueError(f"prompts: {len(long)} of {len(prompts)} prompts do not fit the student's context of "
                         f"{context} tokens with --max-new-tokens {cfg.max_new_tokens} (the first: source id "
                         f"{first.source_id}, {n} tokens); shorten them or lower --max-new-tokens")


def run_mining(cfg: MiningConfig) -> MiningSummary:
    """Validate ``cfg``, load the prompts (none: ``ValueError``), check before loading any weights
    that the teacher (default: the student's recorded ``focus_source_model``) shares the student's
    vocabulary and that ``cfg.output`` may be resumed with these settings (or, with ``restart``,
    start it over), then load both models (``AutoModelForCausalLM.from_pretrained``) onto this
    process's device and call :func:`mine_pairs` with the student's tokenizer."""
    cfg.validate(models=True)
    device = resolve_device(cfg.device, "--device") if cfg.device else None  # before reading anything
    prompts = load_prompts(
        cfg.prompts, text_field=cfg.text_field, input_field=cfg.input_field, id_field=cfg.id_field,
        text_unit=cfg.text_unit, split=cfg.split, dataset_config=cfg.dataset_config, limit=cfg.max_prompts,
    )
    teacher_path = cfg.teacher_path()
    tokenizer, vocab_size = _check_vocab(cfg, teacher_path)
    _check_context(cfg, tokenizer, prompts)
    state = process_state()
    device = device or state.device
    dtype = cfg.dtype if cfg.dtype == "auto" else getattr(torch, cfg.dtype)

    def load(path: str):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
        return model.to(device).eval()

    with output_lock(cfg.output, state):  # held from the record to the last row (mine_pairs takes it again: a no-op)
        empty = prepare_output(cfg, cfg.run_record(cfg.student, teacher_path, vocab_size), state)
        try:
            student, teacher = load(cfg.student), load(teacher_path)
            return mine_pairs(student, teacher, tokenizer, prompts, replace(cfg, restart=False))  # restarted above
        except BaseException:
            if empty and state.is_main_process:  # failed before its first row: leave no run record behind
                discard_new_record(cfg.output)
            raise
