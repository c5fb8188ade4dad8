"""Peak memory of the importance pass: gradient hooks (axolotl_focus) vs holding every .grad (LLM-Pruner).

Each approach runs in its own subprocess on the same randomly initialised fp32 LLaMA and the same
calibration batch. On CPU the peak is the process's peak RSS during the pass (VmHWM reset through
/proc/self/clear_refs after the model is built; ru_maxrss delta where that is unavailable; glibc's
mmap threshold pinned so that freed tensors leave the RSS), on CUDA `torch.cuda.max_memory_allocated`.
Both are reported relative to the fp32 model size. The hook approach (default of
`compute_importance`) also checkpoints decoder activations and chunks the LM loss; the baseline is
LLM-Pruner's pass (every parameter requires grad, plain HF loss, all .grad held to the end).

    python benchmarks/prune_memory.py                       # ~670 MB LLaMA, 10 x 64 tokens, CPU
    python benchmarks/prune_memory.py --device cuda --hidden 2048 --layers 16
"""

import argparse
import json
import os
import resource
import subprocess
import sys

from peak_rss import reset_peak as _reset_peak  # noqa: E402
from peak_rss import status_kb as _status_kb  # noqa: E402


def worker(args) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from axolotl_focus.prune.importance import compute_importance
    from axolotl_focus.prune.settings import PruneSettings

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
    )
    device = torch.device(args.device)
    model = LlamaForCausalLM(config).to(device=device, dtype=torch.float32)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, args.vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    cfg = PruneSettings(importance=args.importance)
    hold = args.worker == "all_grads"
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        compute_importance(model, None, ids, cfg, hold_grads=hold)
        torch.cuda.synchronize()
        peak, method = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        rss_kb = _status_kb("VmRSS")
        if _reset_peak():
            compute_importance(model, None, ids, cfg, hold_grads=hold)
            peak_kb, method = _status_kb("VmHWM"), "peak RSS (VmHWM, reset after model build)"
        else:  # ru_maxrss includes the model build; report the delta over the RSS before the pass
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            compute_importance(model, None, ids, cfg, hold_grads=hold)
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            method = "ru_maxrss" + (" (includes model build)" if peak_kb == before else "")
        # peak of the pass = model (resident) + what the pass added on top of the RSS before it
        peak = model_bytes + (peak_kb - rss_kb) * 1024
    print(json.dumps({"approach": args.worker, "peak": peak, "model": model_bytes, "method": method}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--importance", default="param_first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=("hooks", "all_grads"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    # glibc's dynamic mmap threshold keeps freed large blocks resident, so RSS would measure
    # allocator caching rather than live tensors: pin the threshold in the workers.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    results = {}
    for approach in ("hooks", "all_grads"):
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--worker", approach, *sys.argv[1:]],
            capture_output=True, text=True, check=False, env=env,
        )
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode or not lines:
            sys.exit(f"{approach} worker failed:\n{out.stderr[-3000:]}")
        results[approach] = json.loads(lines[-1])

    mb = 2**20
    model_mb = results["hooks"]["model"] / mb
    print(
        f"LLaMA hidden={args.hidden} layers={args.layers} intermediate={args.intermediate} heads={args.heads}/"
        f"{args.kv_heads} vocab={args.vocab}; fp32 model {model_mb:.0f} MB; calibration {args.samples} x "
        f"{args.seq_len} tokens; importance={args.importance}; device={args.device}; {results['hooks']['method']}"
    )
    print("| approach | peak (MB) | peak / fp32 model |")
    print("|---|---|---|")
    names = {"hooks": "post-accumulate-grad hooks (axolotl_focus)", "all_grads": "all .grad held (LLM-Pruner)"}
    for approach, r in results.items():
        print(f"| {names[approach]} | {r['peak'] / mb:.0f} | {r['peak'] / r['model']:.2f} |")
    ratio = results["hooks"]["peak"] / results["all_grads"]["peak"]
    print(f"hooks / all-grads peak ratio: {ratio:.2f} (target <= 0.60): {'OK' if ratio <= 0.6 else 'ABOVE TARGET'}")


if __name__ == "__main__":
    main()
