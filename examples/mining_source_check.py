"""Which student should RePAIR mine from? The width-pruned checkpoint or the SFT-tuned one (the model
being repaired), measured on the WikiText-2 *valid* split before the experiment runs.

    axolotl-focus demo --until sft --out demo_out        # the pruned and the CE-tuned students (~6 min)
    python examples/mining_source_check.py --demo-out demo_out --threads 2     # ~4 min on 2 cores

Each student continues the same ``--prompts`` cleaned valid prefixes (50 tokens, top-p 0.9 at
``--temperature``, ``--new-tokens`` tokens): a mining run's negatives. The tuned student continues
them again under another seed: the loops the fine-tuned models make, which RePAIR should repair.
Printed per source: the share of degenerate samples (the yield of negatives), the loop kinds (the
period of the loop unit: 1-2 tokens, 3-5, 6 or more) and the **match**: the overlap of the source's
loop units with the tuned model's own, ``sum_u min(p_source(u), p_tuned(u))`` over the units
(:func:`axolotl_focus.degeneration.loop_unit`) of their degenerate continuations (1: the same loops
in the same proportions, 0: none shared); with ``--json`` the numbers. The demo mines from the tuned
student when its yield and its match are both at least the pruned checkpoint's.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch


def overlap(a: Counter, b: Counter) -> float:
    """``sum_u min(p_a(u), p_b(u))`` of two counts of loop units (0 when either is empty)."""
    na, nb = sum(a.values()), sum(b.values())
    if not na or not nb:
        return 0.0
    return sum(min(a[u] / na, b[u] / nb) for u in a.keys() & b.keys())


def kind(unit: tuple[int, ...]) -> str:
    return "1-2 tokens" if len(unit) <= 2 else "3-5 tokens" if len(unit) <= 5 else "6+ tokens"


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from axolotl_focus.degeneration import loop_unit
    from axolotl_focus.evaluate.table1 import continuations
    from axolotl_focus.micro import corpus_documents
    from axolotl_focus.prune import modeling_pruned_llama  # noqa: F401  (pruned_llama with the Auto classes)

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-out", default="demo_out", help="a demo folder with its prune and sft stages done")
    parser.add_argument("--prompts", type=int, default=160)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.demo_out)
    sources = {"pruned": out / "2_prune" / "width", "tuned": out / "4_sft" / "ce-s0" / "merged"}
    tokenizer = AutoTokenizer.from_pretrained(sources["pruned"], trust_remote_code=False)
    prompts = []
    for doc in corpus_documents("valid", clean=True):
        ids = tokenizer(doc)["input_ids"]
        if len(ids) >= 60:
            prompts.append(ids[:50])
        if len(prompts) == args.prompts:
            break

    def units(path: Path, seed: int) -> list[tuple[int, ...] | None]:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        gens = continuations(model, tokenizer, prompts, args.new_tokens, do_sample=True, seed=seed, batch=32,
                             temperature=args.temperature)
        return [loop_unit(g) for g in gens]

    target = [u for u in units(sources["tuned"], seed=1) if u is not None]
    rows = {}
    for name, path in sources.items():
        found = units(path, seed=0)
        loops = [u for u in found if u is not None]
        kinds = Counter(kind(u) for u in loops)
        rows[name] = {"degenerate_share": len(loops) / len(found), "loops": len(loops),
                      "kinds": {k: kinds[k] / max(1, len(loops)) for k in ("1-2 tokens", "3-5 tokens", "6+ tokens")},
                      "match": overlap(Counter(loops), Counter(target)),
                      "top": [[tokenizer.decode(list(u)), c] for u, c in Counter(loops).most_common(5)]}
    target_kinds = Counter(kind(u) for u in target)
    print(f"{len(prompts)} valid prefixes, top-p 0.9 at T {args.temperature:g}, {args.new_tokens} new tokens; the "
          f"tuned model's own loops (seed 1): {len(target)} degenerate, kinds "
          + ", ".join(f"{k} {target_kinds[k] / max(1, len(target)):.0%}" for k in ("1-2 tokens", "3-5 tokens",
                                                                                    "6+ tokens")))
    print("| source | degenerate share | loop kinds (1-2 / 3-5 / 6+ tokens) | match | top loop units |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        k = r["kinds"]
        top = "; ".join(f"`{t!r}` ({c})" for t, c in r["top"])
        print(f"| {name} | {r['degenerate_share']:.1%} | {k['1-2 tokens']:.0%} / {k['3-5 tokens']:.0%} / "
              f"{k['6+ tokens']:.0%} | {r['match']:.1%} | {top} |")
    better = all(rows["tuned"][key] >= rows["pruned"][key] for key in ("degenerate_share", "match"))
    print(f"mine from the tuned student: {'yes' if better else 'no'} (yield and match both at least the pruned "
          "one's)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "target_loops": len(target), "tuned": better}, indent=2))


if __name__ == "__main__":
    main()
