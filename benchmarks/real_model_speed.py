"""Speed on the real model (SmolLM2-135M-Instruct, LLaMA architecture, GQA 9/3 heads, 30 layers,
vocabulary 49,152; materialized offline by :func:`axolotl_focus.embedded_model.materialize`),
everything measured side by side in one run:

(a) Generation throughput of the unpruned model (greedy, :func:`axolotl_focus.generation.generate_batch`)
    at batch 1, 16 and 64, for each ``--threads`` value (``torch.set_num_threads``) and three
    numeric modes: ``fp32``; ``bf16`` = the weights cast with ``model.to(torch.bfloat16)``;
    ``autocast`` = fp32 weights under ``torch.autocast(device, dtype=torch.bfloat16)``. Tokens/s =
    tokens generated (the row-steps the decoding loop computed) / wall time, prefill included.
    Each bf16 mode is also checked against fp32 on the batch-16 prompts: agreement of the
    next-token argmax over every prompt position, mean KL(fp32 || mode) of the next-token
    distributions, and the share of rows whose greedy continuation equals fp32's.
(b) One training step (forward + backward) on 4 x 128 tokens, CE only vs CE + FOCUS, on the
    trainer's loss path (the code of ``FocusTrainer.compute_loss`` without axolotl: the student's
    final hidden states with ``logits_to_keep=1``, the teacher's decoder hidden states under
    ``no_grad``, :class:`axolotl_focus.train.losses.FusedCEDistillLoss` with the trainer's defaults,
    ``alpha`` 0.05, ``tau`` 2, ``beta`` 15, ``gamma`` 1, chunks of 1024). Student: a copy of the
    model with LoRA (peft, r 16, alpha 32, every linear layer, random init so that it starts off
    the teacher; ``--full`` trains all weights, perturbed); teacher: the model itself (frozen).
    The FOCUS / CE time ratio is printed next to its limit ``1 + teacher forward / CE step`` (the
    teacher's decoder forward added to the student's forward + backward), the teacher forward
    timed in the same run; the rest of the excess is the fused loss's teacher head and softmaxes.
(c) RePAIR mining's student pass (as ``axolotl_focus.mine.run._student_pass`` calls it: open-ended prompts of the
    first 50 tokens of WikiText-2 validation documents, top-p 0.9, temperature 0.7, 128 new
    tokens, the loop detector on, row seeds from the source ids) on 32 prompts: batched (16) with
    the shrinking loop, batched with ended rows kept as padding (``shrink=False``, the cost of HF
    ``generate``), and one prompt at a time. Reported: tokens/s, decoding steps, row-steps
    computed vs rows x steps, stop reasons, and how many rows came out identical in the three
    runs (per-row generators: a row's sample does not depend on its batch, up to float rounding).

Every ratio is computed from times measured in this run; the JSON (``--json``, default
``benchmarks/results/real_model_speed.json``) holds the raw numbers, the CPU flags, the torch
version and the load average before and after (the machine may be shared: compare only numbers
from the same run).

    python benchmarks/real_model_speed.py                 # the real model on CPU (minutes)
    python benchmarks/real_model_speed.py --quick         # a tiny local LLaMA, small sizes (seconds; CI)
    python benchmarks/real_model_speed.py --device cuda --threads 1

(b) and (c) run at the thread count that was fastest in (a) at batch 16 in fp32.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from axolotl_focus.files import write_json  # noqa: E402
from axolotl_focus.generation import generate_batch  # noqa: E402
from axolotl_focus.mine.config import MiningConfig  # noqa: E402
from axolotl_focus.mine.run import student_row_seed  # noqa: E402
from axolotl_focus.prompt_format import encode_prompt  # noqa: E402
from axolotl_focus.sources import Prompt  # noqa: E402

MODES = ("fp32", "bf16", "autocast")


# --------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """``(seconds, result)`` of one call, synchronized on CUDA."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def cpu_flags() -> dict:
    info = {"processor": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
        flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
        info |= {"model_name": name, "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
                 "avx512f": "avx512f" in flags}
    except OSError:
        pass
    return info


def load_model(args, device: torch.device):
    """``(model, tokenizer, name)``: the real model, or a tiny local LLaMA with ``--quick``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.quick:
        from transformers import LlamaForCausalLM

        from axolotl_focus.micro import build_tokenizer, corpus_documents, llama_config, pretrain

        docs = corpus_documents("valid")[:200]
        tokenizer = build_tokenizer(docs, vocab_size=384)
        torch.manual_seed(0)
        model = LlamaForCausalLM(llama_config(tokenizer, layers=2, heads=4, kv_heads=2))
        # trained on one sentence repeated, so that it loops and the loop detector ends rows early
        loop = " ".join(["It was one of the first in the state ."] * 6)
        pretrain(model, tokenizer, [loop], steps=50, batch=8, seed=0, progress=False)
        name = "tiny looping LLaMA (2 layers, hidden 64, GQA 4/2, vocab 384)"
    else:
        from axolotl_focus.embedded_model import materialize

        path = materialize()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        name = f"{Path(path).name} ({path})"
    return model.to(device).eval(), tokenizer, name


def prompts_for(tokenizer, count: int, prefix_tokens: int) -> list[tuple[Prompt, list[int]]]:
    """``count`` WikiText-2 validation documents as open-ended mining prompts (``prefix_tokens``)."""
    from axolotl_focus.micro import corpus_documents

    cfg = MiningConfig(prefix_tokens=prefix_tokens)
    out = []
    for i, doc in enumerate(corpus_documents("valid")):
        if len(tokenizer(doc, add_special_tokens=False)["input_ids"]) < prefix_tokens + 10:
            continue
        out.append((Prompt(f"wikitext2-valid-{i}", doc), encode_prompt(tokenizer, doc, cfg)[1]))
        if len(out) == count:
            return out
    raise SystemExit(f"only {len(out)} validation documents have {prefix_tokens + 10} tokens; need {count}")


def autocast_for(mode: str, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if mode == "autocast" else nullcontext()


# --------------------------------------------------------------------------------------------
# (a) generation
# --------------------------------------------------------------------------------------------


def generation(models: dict, tokenizer, prompts: list[list[int]], args, device) -> list[dict]:
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for mode in MODES:
            model = models[mode]
            for batch in args.batches:
                chunk = prompts[:batch]
                try:
                    with autocast_for(mode, device):
                        generate_batch(model, tokenizer, chunk, [2] * batch, do_sample=False)  # warm-up
                        times = []
                        for _ in range(args.repeats):
                            seconds, gen = timed(lambda: generate_batch(model, tokenizer, chunk,
                                                                        [args.gen_tokens] * batch, do_sample=False),
                                                 device)
                            times.append(seconds)
                except Exception as exc:  # a mode the platform cannot run: reported, not fatal
                    rows.append({"threads": threads, "mode": mode, "batch": batch, "error": repr(exc)[:300]})
                    continue
                seconds = statistics.median(times)
                rows.append({"threads": threads, "mode": mode, "batch": batch, "seconds": seconds,
                             "tokens": gen.row_steps, "steps": gen.steps, "tokens_per_s": gen.row_steps / seconds})
                print(f"  (a) threads {threads} {mode:8s} batch {batch:3d}: {gen.row_steps:5d} tokens in "
                      f"{seconds:7.2f} s = {gen.row_steps / seconds:8.1f} tokens/s", flush=True)
    return rows


def bf16_check(models: dict, tokenizer, prompts: list[list[int]], args, device) -> list[dict]:
    """Each bf16 mode against fp32: next-token argmax agreement and KL over the prompt positions,
    greedy continuations equal to fp32's."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    valid = mask.bool()

    def logprobs(mode):
        with torch.inference_mode(), autocast_for(mode, device):
            logits = models[mode](input_ids=ids, attention_mask=mask, position_ids=positions).logits
        return torch.log_softmax(logits.float()[valid], dim=-1)

    ref = logprobs("fp32")
    ref_greedy = generate_batch(models["fp32"], tokenizer, prompts, [args.gen_tokens] * len(prompts),
                                do_sample=False).tokens
    out = []
    for mode in MODES[1:]:
        try:
            lp = logprobs(mode)
            with autocast_for(mode, device):
                greedy = generate_batch(models[mode], tokenizer, prompts, [args.gen_tokens] * len(prompts),
                                        do_sample=False).tokens
        except Exception as exc:
            out.append({"mode": mode, "error": repr(exc)[:300]})
            continue
        same_prefix = []
        for a, b in zip(ref_greedy, greedy):
            n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            same_prefix.append(n)
        row = {"mode": mode, "positions": int(valid.sum()),
               "argmax_agreement": float((lp.argmax(-1) == ref.argmax(-1)).float().mean()),
               "mean_kl": float((ref.exp() * (ref - lp)).sum(-1).mean()),
               "greedy_rows_equal": sum(a == b for a, b in zip(ref_greedy, greedy)), "rows": len(prompts),
               "greedy_mean_equal_prefix": statistics.fmean(same_prefix)}
        out.append(row)
        print(f"  (a) {mode} vs fp32: next-token argmax agreement {row['argmax_agreement']:.4f}, mean KL "
              f"{row['mean_kl']:.2e} over {row['positions']} positions; greedy rows equal "
              f"{row['greedy_rows_equal']}/{row['rows']} (mean equal prefix {row['greedy_mean_equal_prefix']:.1f} "
              f"of {args.gen_tokens})", flush=True)
    return out


# --------------------------------------------------------------------------------------------
# (b) one training step
# --------------------------------------------------------------------------------------------


def train_step(model, tokenizer, args, device) -> dict:
    from axolotl_focus.micro import corpus_text
    from axolotl_focus.train.losses import DistillSpec, FusedCEDistillLoss

    ids = tokenizer(corpus_text("valid"), add_special_tokens=False)["input_ids"]
    rows, length = args.train_rows, args.train_len
    if len(ids) < rows * length:
        raise SystemExit("not enough validation text for the training batch")
    input_ids = torch.tensor(ids[: rows * length], device=device).view(rows, length)
    attention_mask = torch.ones_like(input_ids)
    targets = torch.nn.functional.pad(input_ids, (0, 1), value=-100)[:, 1:]
    valid = targets != -100
    tokens = int(valid.sum())

    teacher = model
    teacher.requires_grad_(False)
    student = copy.deepcopy(model)
    # the student starts off the teacher (perturbed weights / LoRA with random B) so that the
    # distillation term is not zero; the work per step is the same either way
    if args.full:
        student.requires_grad_(True)
        gen = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype) * 0.05 * p.std())
        kind = "full"
    else:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        student = get_peft_model(student, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                     target_modules="all-linear", init_lora_weights=False))
        kind = "LoRA r16 (all linear layers)"
    student.train()
    base = student.get_base_model() if hasattr(student, "get_base_model") else student
    head = base.get_output_embeddings().weight
    t_head = teacher.get_output_embeddings().weight
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    alpha = 0.05

    def teacher_hidden():
        with torch.no_grad():
            return teacher.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                         use_cache=False).last_hidden_state

    def step(focus: bool):
        out = student(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                      logits_to_keep=1, use_cache=False)
        hidden = out.hidden_states[-1]
        t_hidden = teacher_hidden()[valid] if focus else None
        fused = FusedCEDistillLoss(DistillSpec("focus" if focus else "none"), ce_weight=1.0 / tokens,
                                   distill_weight=alpha / tokens, chunk_size=1024)
        loss, sums = fused(hidden[valid], head, targets[valid], teacher_hidden=t_hidden,
                           teacher_head=t_head if focus else None)
        loss.backward()
        for p in student.parameters():
            p.grad = None
        return {k: float(v) / tokens for k, v in sums.items()}

    results = {}
    for label, fn in (("ce", lambda: step(False)), ("focus", lambda: step(True)), ("teacher_forward", teacher_hidden)):
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            seconds, value = timed(fn, device)
            times.append(seconds)
        results[label] = {"seconds": statistics.median(times), "all": times}
        if label != "teacher_forward":
            results[label]["loss_terms"] = value
    ce, focus, teach = (results[k]["seconds"] for k in ("ce", "focus", "teacher_forward"))
    out = {"student": kind, "trainable_parameters": trainable, "rows": rows, "tokens_per_row": length,
           "tokens": tokens, **{f"{k}_s": results[k]["seconds"] for k in results},
           "ce_loss": results["ce"]["loss_terms"]["ce"], "focus_ce_loss": results["focus"]["loss_terms"]["ce"],
           "focus_distill": results["focus"]["loss_terms"]["distill"],
           "focus_over_ce": focus / ce, "limit_1_plus_teacher_over_ce": 1 + teach / ce}
    print(f"  (b) {kind}, {rows} x {length} tokens: CE step {ce:.3f} s, FOCUS step {focus:.3f} s, teacher forward "
          f"{teach:.3f} s; FOCUS/CE {focus / ce:.3f} vs limit 1 + teacher/CE = {1 + teach / ce:.3f}", flush=True)
    return out


# --------------------------------------------------------------------------------------------
# (c) mining
# --------------------------------------------------------------------------------------------


def mining(model, tokenizer, items: list[tuple[Prompt, list[int]]], args, device) -> dict:
    cfg = MiningConfig(top_p=0.9, temperature=0.7, max_new_tokens=args.mine_tokens, seed=0,
                       prefix_tokens=args.prefix_tokens)
    detector = dict(threshold=cfg.threshold, min_tokens=cfg.detector_min_tokens, min_repeats=cfg.detector_min_repeats)

    def run(batch: int, shrink: bool) -> dict:
        tokens, reasons, steps, row_steps, padded = [], [], 0, 0, 0

        def go():
            nonlocal steps, row_steps, padded
            for start in range(0, len(items), batch):
                chunk = items[start : start + batch]
                gen = generate_batch(model, tokenizer, [ids for _, ids in chunk], [cfg.max_new_tokens] * len(chunk),
                                     seed=cfg.seed, row_seeds=[student_row_seed(p.source_id) for p, _ in chunk],
                                     top_p=cfg.top_p, temperature=cfg.temperature, detector_kwargs=detector,
                                     shrink=shrink)
                tokens.extend(gen.tokens)
                reasons.extend(gen.reason)
                steps += gen.steps
                row_steps += gen.row_steps
                padded += gen.padded_row_steps

        seconds, _ = timed(go, device)
        generated = sum(map(len, tokens))
        return {"batch": batch, "shrink": shrink, "seconds": seconds, "tokens": generated,
                "tokens_per_s": generated / seconds, "steps": steps, "row_steps": row_steps,
                "padded_row_steps": padded, "stops": {r: reasons.count(r) for r in sorted(set(reasons))},
                "_tokens": tokens}

    # warm-up on two prompts
    generate_batch(model, tokenizer, [ids for _, ids in items[:2]], [4, 4], seed=0, top_p=0.9, temperature=0.7)
    runs = {"batched": run(args.mine_batch, True), "batched_padded": run(args.mine_batch, False),
            "one_at_a_time": run(1, True)}
    ref = runs["batched"]["_tokens"]
    for name, r in runs.items():
        r["rows_equal_to_batched"] = sum(a == b for a, b in zip(ref, r.pop("_tokens")))
        print(f"  (c) {name:15s}: {r['tokens']:5d} tokens in {r['seconds']:7.2f} s = {r['tokens_per_s']:7.1f} "
              f"tokens/s; {r['steps']} steps, {r['row_steps']} row-steps of {r['padded_row_steps']} padded; "
              f"stops {r['stops']}; rows equal to batched {r['rows_equal_to_batched']}/{len(items)}", flush=True)
    return {"prompts": len(items), "prefix_tokens": args.prefix_tokens, "max_new_tokens": cfg.max_new_tokens,
            "top_p": cfg.top_p, "temperature": cfg.temperature, "detector": detector, "runs": runs}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def ratios(result: dict) -> dict:
    """Every ratio, from the numbers measured in this run."""
    out = {}
    gen = {(r["threads"], r["mode"], r["batch"]): r["tokens_per_s"] for r in result["generation"] if "error" not in r}
    fewest = min((t for t, _, _ in gen), default=1)
    for (threads, mode, batch), tps in sorted(gen.items()):
        if mode != "fp32" and (threads, "fp32", batch) in gen:
            out[f"gen {mode}/fp32 tokens/s, batch {batch}, {threads} thread(s)"] = tps / gen[(threads, "fp32", batch)]
        if batch != 1 and (threads, mode, 1) in gen:
            out[f"gen batch {batch}/batch 1 tokens/s, {mode}, {threads} thread(s)"] = tps / gen[(threads, mode, 1)]
        if threads != fewest and (fewest, mode, batch) in gen:
            out[f"gen {threads}/{fewest} threads tokens/s, {mode}, batch {batch}"] = tps / gen[(fewest, mode, batch)]
    t = result["train_step"]
    out["train FOCUS/CE step time"] = t["focus_over_ce"]
    out["train limit 1 + teacher forward/CE step"] = t["limit_1_plus_teacher_over_ce"]
    runs = result["mining"]["runs"]
    b, p, one = runs["batched"], runs["batched_padded"], runs["one_at_a_time"]
    out["mining batched/one-at-a-time tokens/s"] = b["tokens_per_s"] / one["tokens_per_s"]
    out["mining shrinking/padded batched time"] = b["seconds"] / p["seconds"]
    out["mining row-steps computed/padded"] = b["row_steps"] / b["padded_row_steps"]
    return out


def markdown(result: dict) -> str:
    lines = [f"Model: {result['model']}; device {result['device']}; torch {result['torch']}; "
             f"load average {result['load_before']} before, {result['load_after']} after", "",
             "(a) generation, greedy, tokens/s", "", "| threads | mode | batch | tokens | s | tokens/s |",
             "|---|---|---|---|---|---|"]
    for r in result["generation"]:
        if "error" in r:
            lines.append(f"| {r['threads']} | {r['mode']} | {r['batch']} | error: {r['error'][:60]} | | |")
        else:
            lines.append(f"| {r['threads']} | {r['mode']} | {r['batch']} | {r['tokens']} | {r['seconds']:.2f} | "
                         f"{r['tokens_per_s']:.1f} |")
    lines += ["", "| mode vs fp32 | argmax agreement | mean KL | greedy rows equal | mean equal prefix |",
              "|---|---|---|---|---|"]
    for r in result["bf16_check"]:
        if "error" in r:
            lines.append(f"| {r['mode']} | error: {r['error'][:60]} | | | |")
        else:
            lines.append(f"| {r['mode']} | {r['argmax_agreement']:.4f} | {r['mean_kl']:.2e} | "
                         f"{r['greedy_rows_equal']}/{r['rows']} | {r['greedy_mean_equal_prefix']:.1f} |")
    t = result["train_step"]
    lines += ["", f"(b) one training step, {t['student']}, {t['rows']} x {t['tokens_per_row']} tokens, "
              f"{result['work_threads']} thread(s)", "", "| step | s |", "|---|---|",
              f"| CE only | {t['ce_s']:.3f} |", f"| CE + FOCUS | {t['focus_s']:.3f} |",
              f"| teacher forward alone | {t['teacher_forward_s']:.3f} |"]
    m = result["mining"]
    lines += ["", f"(c) mining student pass, {m['prompts']} prompts, top-p {m['top_p']}, T {m['temperature']}, "
              f"{m['max_new_tokens']} new tokens, loop detector on, {result['work_threads']} thread(s)", "",
              "| run | batch | tokens | s | tokens/s | steps | row-steps | rows x steps | stops | rows = batched |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in m["runs"].items():
        lines.append(f"| {name} | {r['batch']} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['steps']} | {r['row_steps']} | {r['padded_row_steps']} | {r['stops']} | "
                     f"{r['rows_equal_to_batched']}/{m['prompts']} |")
    lines += ["", "Ratios (this run)", ""] + [f"- {k}: {v:.3f}" for k, v in result["ratios"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts for (a)")
    parser.add_argument("--quick", action="store_true", help="tiny local model and small sizes (seconds)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median); "
                        "default 1 (generation and mining are long), 3 for the training step")
    parser.add_argument("--full", action="store_true", help="(b): train all weights instead of LoRA")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "real_model_speed.json"))
    args = parser.parse_args(argv)
    args.threads = [int(t) for t in args.threads.split(",")]
    if min(args.threads) < 1:
        parser.error("--threads: each value must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    sizes = (dict(batches=[1, 4], gen_tokens=8, train_rows=2, train_len=32, prompts=8, mine_batch=4, mine_tokens=64,
                  prefix_tokens=16) if args.quick else
             dict(batches=[1, 16, 64], gen_tokens=64, train_rows=4, train_len=128, prompts=32, mine_batch=16,
                  mine_tokens=128, prefix_tokens=50))
    for k, v in sizes.items():
        setattr(args, k, v)
    repeats = args.repeats
    device = torch.device(args.device)
    load_before = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()

    model, tokenizer, name = load_model(args, device)
    print(f"model: {name}; device {device}; load average {load_before}", flush=True)
    items = prompts_for(tokenizer, max(args.prompts, max(args.batches)), args.prefix_tokens)
    prompt_ids = [ids for _, ids in items]
    models = {"fp32": model, "autocast": model, "bf16": copy.deepcopy(model).to(torch.bfloat16)}

    args.repeats = repeats or 1
    gen_rows = generation(models, tokenizer, prompt_ids, args, device)
    check_batch = 16 if not args.quick else 4
    torch.set_num_threads(max(args.threads))
    check = bf16_check(models, tokenizer, prompt_ids[:check_batch], args, device)
    del models["bf16"]

    fp32 = [r for r in gen_rows if r["mode"] == "fp32" and "error" not in r]
    mid = min({r["batch"] for r in fp32}, key=lambda b: abs(b - check_batch))
    work_threads = max((r for r in fp32 if r["batch"] == mid), key=lambda r: r["tokens_per_s"])["threads"]
    torch.set_num_threads(work_threads)
    args.repeats = repeats or 3
    train = train_step(model, tokenizer, args, device)
    args.repeats = repeats or 1
    mine = mining(model, tokenizer, items[: args.prompts], args, device)

    result = {"model": name, "device": str(device), "torch": torch.__version__, "cpu": cpu_flags(),
              "quick": args.quick, "threads": args.threads, "work_threads": work_threads,
              "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
              "generation": gen_rows, "bf16_check": check, "train_step": train, "mining": mine}
    result["ratios"] = ratios(result)
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    print()
    print(markdown(result))
    write_json(args.json, result, indent=2, newline=True)
    print(f"wrote {args.json} ({result['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
