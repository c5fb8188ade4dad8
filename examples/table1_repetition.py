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


def main() -> None:
    from transformers import AutoTokenizer

    from axolotl_focus.config import FocusPruneArgs
    from axolotl_focus.micro import build_micro_teacher
    from axolotl_focus.preprocess import run_prune
    from axolotl_focus.table1 import markdown_table, measure, prefixes

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
    rows = measure(models, prompts, args.new_tokens, seed=args.seed, batch=32, progress=True)

    print(f"\n{len(prompts)} prefixes of {args.prefix_tokens} tokens, {args.new_tokens} new tokens, seed {args.seed}\n")
    print(markdown_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({f"{r['model']} / {r['decoding']}": {k: v for k, v in r.items()
                                                                                   if k not in ("model", "decoding")}
                                               for r in rows}, indent=2))


if __name__ == "__main__":
    main()
