"""The paper's Table 1 pattern on a micro model: repetition before and after pruning.

    python examples/table1_repetition.py --work examples/table1/build

Trains (once) a micro LLaMA teacher on the embedded WikiText-2 slice, width-prunes it with the
LLM-Pruner method and depth-prunes it, then continues 50-token prefixes of held-out documents
for 200 tokens with greedy decoding and top-p 0.9 sampling, and reports CREP and rep-n per model.
The pruned models are not fine-tuned here (the paper's Table 1 measures them after fine-tuning;
the fine-tuning comparison is the demo's job).

A sweep over temperatures, width-pruning ratios and seeds, on an existing teacher (pruned into
--work; greedy runs once, being deterministic; cells are mean ± sd over the seeds):

    python examples/table1_repetition.py --teacher demo_out/1_teacher/model --work /tmp/t1sweep \
        --ratios 0.25,0.45 --temperatures 0.5,0.7,0.85,1.0 --seeds 0,1,2 --json /tmp/t1sweep/rows.json
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def main() -> None:
    from transformers import AutoConfig, AutoTokenizer

    from axolotl_focus.evaluate.table1 import (
        decodings,
        markdown_table,
        measure,
        prefixes,
        summarize,
    )
    from axolotl_focus.micro import build_micro_teacher
    from axolotl_focus.prune.cache import run_prune
    from axolotl_focus.prune.settings import PruneSettings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="examples/table1/build")
    parser.add_argument("--steps", type=int, default=800, help="teacher pretraining steps")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prefix-tokens", type=int, default=50)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--target-reduction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher", help="an existing teacher checkpoint (not trained; pruned into --work)")
    parser.add_argument("--ratios", type=floats, help="width-pruning ratios (fractions of all parameters), "
                        "e.g. 0.25,0.45; each gets its own model (default: --target-reduction only)")
    parser.add_argument("--temperatures", type=floats, help="top-p 0.9 sampling temperatures, e.g. "
                        "0.5,0.7,0.85,1.0 (default: 1.0), besides greedy")
    parser.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",")],
                        help="sampling seeds, e.g. 0,1,2 (default: --seed)")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    work = Path(args.work)
    teacher = Path(args.teacher) if args.teacher else work / "teacher"
    if not args.teacher and not (teacher / "config.json").is_file():
        build_micro_teacher(teacher, steps=args.steps, seed=args.seed, layers=8, hidden=128, heads=8,
                            kv_heads=4, intermediate=352)
    models = {"unpruned": str(teacher)}
    last = AutoConfig.from_pretrained(teacher).num_hidden_layers - 1  # the first and last blocks keep their width
    settings = {("width" if args.ratios is None else f"width {ratio:.0%}"):
                PruneSettings(target_param_reduction=ratio, attn_layers=[1, last], mlp_layers=[1, last],
                               seed=args.seed)
                for ratio in args.ratios or [args.target_reduction]}
    settings["depth"] = PruneSettings(method="depth", num_blocks=2, protected_first=1, protected_last=1,
                                       seed=args.seed)
    for name, spec in settings.items():
        path = work / f"{name.replace(' ', '-').replace('%', 'pct')}-pruned"
        if not (path / "config.json").is_file():
            report = run_prune(str(teacher), spec, path)
            print(f"{name}: params {report['params_before']:,} -> {report['params_after']:,} "
                  f"({report['achieved_reduction']:.1%} fewer)")
        models[f"{name} pruned"] = str(path)

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    prompts = prefixes(tokenizer, args.prompts, args.prefix_tokens)
    seeds = args.seeds or [args.seed]
    rows = []
    for i, seed in enumerate(seeds):  # greedy is deterministic: measured with the first seed only
        plan = decodings(args.temperatures or [1.0], greedy=i == 0)
        rows += measure(models, prompts, args.new_tokens, seed=seed, batch=32, progress=True, decodings=plan)
    rows.sort(key=lambda r: list(models).index(r["model"]))  # stable: per model, greedy first

    print(f"\n{len(prompts)} prefixes of {args.prefix_tokens} tokens, {args.new_tokens} new tokens, "
          f"seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}\n")
    print(markdown_table(summarize(rows) if len(seeds) > 1 else rows))
    if args.json and len(seeds) > 1:  # every seed's rows, for per-seed comparisons
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summarize(rows)}, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps({f"{r['model']} / {r['decoding']}": {k: v for k, v in r.items()
                                                                                   if k not in ("model", "decoding")}
                                               for r in rows}, indent=2))


if __name__ == "__main__":
    main()
