"""The follow-up run of docs/results.md ("A follow-up fixed before it ran"): CE and CE + RePAIR at a
given alpha_2 under fresh training seeds, evaluated on test documents disjoint from the
experiment's, judged by the rule of claim (b) (rep-3 and CREP vs CE at -30%, PPL gate +10%).

Needs a finished full demo (``make demo``): its SFT and RePAIR configs, pairs and documents.

    python examples/repair_followup.py --demo demo_out --out followup --alpha 0.1 --seeds 4 5 6 7 --jobs 1

Trains 2 x len(seeds) LoRA runs through ``axolotl train`` (about 4-7 min each on 2 cores), merges
them, evaluates them with ``axolotl-focus eval`` (about 1.5 min a model) and prints the verdict
(and writes ``<out>/verdict.json``). Finished runs and evaluations are reused on a rerun.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from axolotl_focus.demo.runs import axolotl_env
from axolotl_focus.demo.stages import merge_lora
from axolotl_focus.intervals import min_detectable_effect, t_interval, verdict

BIN = os.path.dirname(sys.executable)


def configs(demo: Path, out: Path, alpha: float, seeds) -> list[tuple[str, Path, dict]]:
    runs = []
    for k in seeds:
        for arm, src, extra in (("ce", "4_sft/ce-s0.yml", {}),
                                (f"ce-repair-a{alpha:g}", "6_train/ce-repair-s0.yml", {"focus_repair_alpha": alpha})):
            cfg = yaml.safe_load((demo / src).read_text()) | extra
            name = f"{arm}-s{k}"
            cfg |= {"seed": k, "output_dir": str(out / name), "dataset_prepared_path": str(out / f"prepared-{arm}")}
            path = out / f"{name}.yml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            runs.append((name, path, cfg))
    return runs


def train(item, out: Path, threads: int) -> str:
    name, path, cfg = item
    merged = out / name / "merged"
    if not (merged / "config.json").exists():
        start = time.time()
        with open(out / f"{name}.log", "w") as log:
            subprocess.run([f"{BIN}/axolotl", "train", str(path), "--launcher", "python"], env=axolotl_env(threads),
                           stdout=log, stderr=subprocess.STDOUT, check=True, cwd=out)
        merge_lora(cfg["base_model"], cfg["output_dir"], str(merged))
        print(f"{name}: trained and merged in {time.time() - start:.0f} s", flush=True)
    return f"{name}={merged}"


def fresh_documents(demo: Path, out: Path) -> Path:
    """The demo's test documents minus the ones its evaluation used (found by their prompts)."""
    rows = [json.loads(line) for line in open(demo / "7_eval/documents.jsonl", encoding="utf-8")]
    used_by = next((demo / "7_eval").glob("CE*seed_0*/generations/open_ended.greedy.jsonl"))
    prompts = [json.loads(line)["prompt"][:60] for line in open(used_by, encoding="utf-8")]
    fresh = [r for r in rows if not any(r["text"].startswith(p) for p in prompts)]
    path = out / "documents_fresh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in fresh), encoding="utf-8")
    return path


def judge(out: Path, alpha: float, seeds) -> dict:
    def load(name):
        d = json.loads((out / "eval" / name / "results.json").read_text())
        return d["perplexity"]["ppl"], d["open_ended"]["decodings"]

    rows = {}
    for cond in ("top_p0.9", "greedy"):
        for metric in ("rep-3", "crep", "mean_length"):
            a = [load(f"ce-repair-a{alpha:g}-s{k}")[1][cond]["mean"][metric] for k in seeds]
            b = [load(f"ce-s{k}")[1][cond]["mean"][metric] for k in seeds]
            eff = [x / y - 1 if y else math.nan for x, y in zip(a, b)]
            mean, lo, hi = t_interval(eff)
            rows[f"{cond} {metric}"] = dict(a=a, b=b, effect=mean, lower=lo, upper=hi, mde=min_detectable_effect(eff),
                                           verdict=verdict(lo, hi, -0.30) if metric != "mean_length" else "-")
    ratios = [load(f"ce-repair-a{alpha:g}-s{k}")[0] / load(f"ce-s{k}")[0] - 1 for k in seeds]
    mean, lo, hi = t_interval(ratios)
    gate = "passes" if hi <= 0.10 else "fails" if lo > 0.10 else "undecided"
    primary = [rows["top_p0.9 rep-3"]["verdict"], rows["top_p0.9 crep"]["verdict"]]
    word = ("refuted" if "refuted" in primary or gate == "fails"
            else "holds" if all(v == "holds" for v in primary) and gate == "passes" else "not decided")
    return {"rows": rows, "ppl": dict(per_seed=ratios, mean=mean, lower=lo, upper=hi, gate=gate), "verdict": word}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", type=Path, default=Path("demo_out"), help="a finished full demo's --out")
    p.add_argument("--out", type=Path, default=Path("followup"), help="runs, evaluation and verdict.json")
    p.add_argument("--alpha", type=float, default=0.1, help="alpha_2 of the RePAIR arm")
    p.add_argument("--seeds", type=int, nargs="+", default=[4, 5, 6, 7], help="training seeds (fresh ones)")
    p.add_argument("--jobs", type=int, default=1, help="training runs at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training run and for the evaluation")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    runs = configs(a.demo, a.out, a.alpha, a.seeds)
    models = [train(r, a.out, a.threads) for r in runs[:2]]  # each arm's first run prepares its dataset alone
    with ThreadPoolExecutor(a.jobs) as pool:
        models += list(pool.map(lambda r: train(r, a.out, a.threads), runs[2:]))
    subprocess.run([f"{BIN}/axolotl-focus", "eval", *models, "--tasks", "open_ended", "--metrics", "ppl", "repetition",
                    "--decodings", "top_p", "greedy", "--seeds", "0", "--temperature", "0.6", "--top-p", "0.9",
                    "--documents", str(fresh_documents(a.demo, a.out)), "--num-documents", "48", "--data-seed", "0",
                    "--prefix-tokens", "50", "--max-new-tokens", "100", "--ppl-data", str(a.demo / "7_eval/ppl.txt"),
                    "--ppl-window", "256", "--ppl-stride", "128", "--ppl-max-tokens", "4096", "--batch-size", "48",
                    "--threads", str(a.threads), "--no-progress", "--output-dir", str(a.out / "eval")],
                   env=axolotl_env(a.threads), check=True)
    result = judge(a.out, a.alpha, a.seeds)
    (a.out / "verdict.json").write_text(json.dumps(result, indent=1))
    for key, row in result["rows"].items():
        print(f"{key}: {100 * row['effect']:+.0f}% [{100 * row['lower']:+.0f}%, {100 * row['upper']:+.0f}%] "
              f"(detectable +-{100 * row['mde']:.0f}%) {row['verdict']}")
    g = result["ppl"]
    print(f"PPL vs CE: {100 * g['mean']:+.1f}% [{100 * g['lower']:+.1f}%, {100 * g['upper']:+.1f}%] gate {g['gate']}")
    print("verdict:", result["verdict"])


if __name__ == "__main__":
    main()
