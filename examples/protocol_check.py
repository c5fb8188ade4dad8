"""The real-model demo's decoding protocol, checked on the WikiText-2 *valid* split.

    python examples/protocol_check.py --demo-out demo_out            # ~1.5 min on 2 cores
    python examples/protocol_check.py --demo-out demo_out --model tuned=demo_out/4_sft/ce-s0/merged \
        --temperatures 0.5,0.6,0.7,1.0

Does the width-pruned student (``<demo-out>/2_prune/width``; with ``--model``, also the SFT-tuned
one) loop at top-p 0.9 and temperature 1, or only below it? Continues the 50-token prefixes of the
first ``--prompts`` valid documents (cleaned as the demo's text: markup undone, ``<unk>`` dropped;
``--raw`` keeps them) for 100 tokens with the unpruned teacher and each student at each ``--temperatures`` value
and prints CREP and rep-n (:func:`axolotl_focus.evaluate.table1.measure`). The demo mines and
evaluates at the temperature chosen here; its report is on the *test* split.
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    from transformers import AutoTokenizer

    from axolotl_focus.embedded_model import default_path
    from axolotl_focus.evaluate.table1 import decodings, markdown_table, measure, prefixes

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-out", default="demo_out", help="a finished real-model demo folder (its prune stage)")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--temperatures", default="1.0,0.7", help="comma-separated top-p 0.9 temperatures")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--raw", action="store_true", help="keep WikiText's markup and <unk> (default: cleaned, as the "
                        "demo trains and evaluates)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                        help="also measure this model (e.g. tuned=demo_out/4_sft/ce-s0/merged); repeatable")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    student = f"{args.demo_out}/2_prune/width"
    tokenizer = AutoTokenizer.from_pretrained(student, trust_remote_code=False)
    prompts = prefixes(tokenizer, args.prompts, 50, split="valid", clean=not args.raw)
    temps = tuple(float(t) for t in args.temperatures.split(","))
    models = {"unpruned": str(default_path()), "width pruned": student} | dict(m.split("=", 1) for m in args.model)
    rows = measure(models, prompts, args.new_tokens, seed=0, batch=args.prompts,
                   decodings=decodings(temps, greedy=False))
    print(markdown_table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
