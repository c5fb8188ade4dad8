"""The paper's Table 1 measurement: repetition of unpruned and pruned models, greedy and top-p.

Held-out documents (the embedded WikiText-2 test slice) are cut to ``prefix_tokens``-token
prefixes (BOS included, as the tokenizer encodes them); every model continues each prefix for
``new_tokens`` tokens with greedy decoding and with pure top-p sampling (``top_k = 0``,
temperature 1; :func:`decodings` adds other temperatures), batched through
:func:`~axolotl_focus.generation.generate_batch` (prompt ``i`` samples with its own generator, row
seed ``(seed, i)``, so a continuation does not depend on the batch size). Per model and decoding:
CREP (% of continuations with coverage >= 0.3, r = 4..16) and rep-n (per continuation
``1 - unique/total`` n-grams, averaged, x100) on the generated token ids. :func:`summarize`
averages rows measured with several seeds.

Used by ``examples/table1_repetition.py`` and the demo (``axolotl-focus demo``).
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import fmean, stdev

from tqdm.auto import tqdm

from ..degeneration import crep, rep_ns
from ..generation import generate_batch
from ..micro import corpus_documents

DECODINGS = (("greedy", False, 1.0), ("top-p 0.9", True, 1.0))  # (label, do_sample, temperature)
REP_NS = (2, 3, 4)
METRICS = ("crep", *(f"rep-{n}" for n in REP_NS))


def decodings(temperatures: Sequence[float] = (), greedy: bool = True) -> tuple:
    """Greedy (if ``greedy``) and top-p 0.9 at each temperature, as :data:`DECODINGS` entries;
    labelled ``top-p 0.9`` at temperature 1 (as in :data:`DECODINGS`), ``top-p 0.9 T=t`` otherwise."""
    return DECODINGS[:1] * greedy + tuple(("top-p 0.9" + (f" T={t:g}" if t != 1 else ""), True, float(t))
                                          for t in temperatures)


def prefixes(tokenizer, count: int, prefix_tokens: int, split: str = "test", clean: bool = False
             ) -> list[list[int]]:
    """The first ``prefix_tokens`` ids of the first ``count`` documents of the embedded slice
    (cleaned with ``clean``: :func:`axolotl_focus.wikitext.clean`) that have at least ``prefix_tokens + 10``
    tokens."""
    out = []
    for doc in corpus_documents(split, clean=clean):
        ids = tokenizer(doc)["input_ids"]
        if len(ids) >= prefix_tokens + 10:
            out.append(ids[:prefix_tokens])
        if len(out) == count:
            break
    return out


def continuations(model, tokenizer, prompts: Sequence[Sequence[int]], new_tokens: int, *, do_sample: bool,
                  seed: int = 0, batch: int = 32, top_p: float = 0.9, temperature: float = 1.0) -> list[list[int]]:
    """Generated ids (EOS excluded) for every prompt, in order."""
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        rows = generate_batch(model, tokenizer, chunk, [new_tokens] * len(chunk), seed=seed,
                              row_seeds=range(start, start + len(chunk)), do_sample=do_sample, top_p=top_p,
                              temperature=temperature)
        out.extend(rows.tokens)
    return out


def repetition_row(texts: Sequence[Sequence[int]], ns: Sequence[int] = REP_NS) -> dict[str, float]:
    """``crep`` and ``rep-n`` for ``ns`` of a list of generated token-id lists."""
    return {"crep": crep(texts), **{f"rep-{n}": v for n, v in rep_ns(texts, ns).items()}}


def measure(models: dict[str, str], prompts: Sequence[Sequence[int]], new_tokens: int, *, seed: int = 0,
            batch: int = 32, progress: bool = False, decodings: Sequence[tuple] = DECODINGS) -> list[dict]:
    """Rows ``{"model", "decoding", "crep", "rep-2", "rep-3", "rep-4"}`` for every model
    (``{name: checkpoint path}``, pruned checkpoints included) under every decoding
    (``(label, do_sample, temperature)``; greedy and top-p 0.9 at temperature 1 by default)."""
    import torch  # heavy: torch and transformers only once models are measured
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = []
    bar = tqdm(total=len(models) * len(decodings), desc="Table 1 generations", unit="run", disable=not progress)
    for name, path in models.items():
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        with torch.inference_mode():
            for decoding, sample, temperature in decodings:
                texts = continuations(model, tokenizer, prompts, new_tokens, do_sample=sample, seed=seed, batch=batch,
                                      temperature=temperature)
                rows.append({"model": name, "decoding": decoding, **repetition_row(texts)})
                bar.update()
        del model
    bar.close()
    return rows


def summarize(rows: Sequence[dict]) -> list[dict]:
    """One row per (model, decoding), in first-seen order: the metrics' means over the rows
    measured with different seeds, ``seeds`` (how many) and ``sd`` (``{metric: sample standard
    deviation}``, 0 for a single seed)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["decoding"]), []).append(r)
    return [{"model": m, "decoding": d, "seeds": len(g), **{k: fmean(r[k] for r in g) for k in METRICS},
             "sd": {k: stdev(r[k] for r in g) if len(g) > 1 else 0.0 for k in METRICS}}
            for (m, d), g in groups.items()]


def markdown_table(rows: Sequence[dict]) -> str:
    """The rows as a Markdown table (CREP in %, rep-n x100); rows from :func:`summarize` with
    more than one seed show ``mean ± sd`` and a seeds column."""
    seeds = any(r.get("seeds", 1) > 1 for r in rows)
    head = "| model | decoding |" + " seeds |" * seeds + " CREP (%) | rep-2 | rep-3 | rep-4 |"
    lines = [head, "|---" * head.count(" |") + "|"]
    for r in rows:
        cells = [f"{r[k]:.1f}" + (f" ± {r['sd'][k]:.1f}" if r.get("seeds", 1) > 1 else "") for k in METRICS]
        lines.append(f"| {r['model']} | {r['decoding']} |" + f" {r.get('seeds', 1)} |" * seeds
                     + "".join(f" {c} |" for c in cells))
    return "\n".join(lines) + "\n"
