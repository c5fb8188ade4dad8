"""The paper's Table 1 pattern on a micro model: repetition before and after pruning.

    python examples/table1_repetition.py --work examples/table1/build

Trains (once) a micro LLaMA teacher on the embedded WikiText-2 slice, width-prunes it with the
LLM-Pruner method and depth-prunes it, then continues 50-token prefixes of held-out documents
for 200 tokens with greedy decoding and top-p 0.9 sampling, and reports CREP and rep-n per model.
The pruned models are not fine-tuned here (the paper's Table 1 measures them after fine-tuning;
the fine-tuning comparison is the demo's job).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch


def prefixes(tokenizer, count: int, prefix_tokens: int) -> list[list[int]]:
    from axolotl_focus.micro import corpus_documents

    out = []
    for doc in corpus_documents("test"):
        ids = tokenizer(doc)["input_ids"]
        if len(ids) >= prefix_tokens + 10:
            out.append(ids[:prefix_tokens])
        if len(out) == count:
            break
    return out


def continuations(path: str, prompts, new_tokens: int, do_sample: bool, seed: int, batch: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from axolotl_focus.mining import generate_batch

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        rows = generate_batch(model, tokenizer, chunk, [new_tokens] * len(chunk), seed=seed + start,
                              do_sample=do_sample, top_p=0.9)
        out.extend(rows.tokens)
    return out


def main() -> None:
    from axolotl_focus.config import FocusPruneArgs
    from axolotl_focus.degeneration import crep, rep_ns
    from axolotl_focus.micro import build_micro_teacher
    from axolotl_focus.preprocess import run_prune
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="examples/table1/build")
    parser.add_argument("--steps", type=int, default=800, help="teacher pretraining steps")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prefix-tokens", type=int, default=50)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--target-reduction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    work = Path(args.work)
    teacher = work / "teacher"
    if not (teacher / "config.json").is_file():
        build_micro_teacher(teacher, steps=args.steps, seed=args.seed, layers=8, hidden=128, heads=8,
                            kv_heads=4, intermediate=352)
    models = {"unpruned": str(teacher)}
    settings = {
        "width": FocusPruneArgs(target_param_reduction=args.target_reduction, attn_layers=[1, 7],
                                mlp_layers=[1, 7], seed=args.seed),
        "depth": FocusPruneArgs(method="depth", num_blocks=2, protected_first=1, protected_last=1,
                                seed=args.seed),
    }
    for name, spec in settings.items():
        path = work / f"{name}-pruned"
        if not (path / "config.json").is_file():
            report = run_prune(str(teacher), spec, path)
            print(f"{name}: params {report['params_before']:,} -> {report['params_after']:,} "
                  f"({report['achieved_reduction']:.1%} fewer)")
        models[f"{name} pruned"] = str(path)

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    prompts = prefixes(tokenizer, args.prompts, args.prefix_tokens)
    results = {}
    for name, path in models.items():
        for decoding, sample in (("greedy", False), ("top-p 0.9", True)):
            texts = continuations(path, prompts, args.new_tokens, sample, args.seed, batch=32)
            reps = rep_ns(texts, (2, 3, 4))
            results[(name, decoding)] = {"crep": crep(texts), **{f"rep-{n}": v for n, v in reps.items()}}

    print(f"\n{len(prompts)} prefixes of {args.prefix_tokens} tokens, {args.new_tokens} new tokens, seed {args.seed}\n")
    print("| model | decoding | CREP (%) | rep-2 | rep-3 | rep-4 |")
    print("|---|---|---|---|---|---|")
    for (name, decoding), r in results.items():
        print(f"| {name} | {decoding} | {r['crep']:.1f} | {r['rep-2']:.1f} | {r['rep-3']:.1f} | {r['rep-4']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({f"{k[0]} / {k[1]}": v for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
