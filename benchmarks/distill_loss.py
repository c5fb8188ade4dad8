"""CE + distillation loss, forward + backward: plain dense logits vs fused chunks vs Liger-Kernel.

Three implementations of ``ce_scale * CE + distill_scale * D`` (the trainer's objective with
``focus_ce_alpha = 1`` and ``focus_alpha = alpha``, both divided by the number of tokens), each
from the same student/teacher final hidden states ``[tokens, hidden]`` and lm_head weights
``[vocab, hidden]``, each differentiated to the student hidden states and the student lm_head:

* ``plain``: ``h @ W.T`` for student and teacher (full ``[tokens, vocab]`` logits), then
  :func:`axolotl_focus.train.losses.reference_ce_distill` and autograd.
* ``fused``: :class:`axolotl_focus.train.losses.FusedCEDistillLoss` (token chunks, closed-form gradient).
* ``liger``: ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`` (chunked, ``torch.func``
  gradients), the closest published peer. It computes generalized **JSD** (beta = 0.5) + hard CE,
  not FOCUS, so its value is not compared; only its time and memory are. ``compiled=False`` on
  CPU; on CUDA its default ``torch.compile`` is used (warm-up run absorbs the compilation).

Every (implementation, loss, shape) runs in its own fresh subprocess (``--worker``) so that the
peaks do not contaminate each other; the parent collects one JSON line per worker. Memory is the
peak *added* by the loss over the memory held right after the inputs (hidden states, heads,
labels) exist:

* CPU: peak RSS. The worker imports everything and allocates the inputs, reads ``VmRSS`` (the
  baseline), then resets the kernel's high-water mark ``VmHWM`` to the current RSS by writing
  ``5`` to ``/proc/self/clear_refs``, runs warm-up + repeats, and reads ``VmHWM``; the loss peak is
  ``VmHWM - baseline``. The kernel maintains VmHWM at every page fault, so no short-lived peak is
  missed (unlike sampling). Where ``clear_refs`` is unavailable it falls back to the increase of
  ``ru_maxrss`` (a process-lifetime maximum) over its value at the baseline, flagged in the
  output; that is exact as long as the RSS never exceeded the baseline before it, which holds
  because the inputs are built in place without larger temporaries. Workers run with glibc's
  ``MALLOC_MMAP_THRESHOLD_=65536`` and ``MALLOC_TRIM_THRESHOLD_=0`` so that freed tensors leave the
  RSS instead of being cached by the allocator, which would otherwise measure allocator caching
  rather than live tensors. The student gradients (``h.grad``, ``W.grad``) are dropped before
  every run, so the peak is that of one forward + backward, gradients included (they are the same
  size for all implementations).
* CUDA: ``torch.cuda.max_memory_allocated() - memory_allocated()`` after
  ``reset_peak_memory_stats()`` (caching allocator excluded).

Time is the median wall time of ``--repeats`` forward + backward runs after one warm-up run, in
the same worker (``torch.cuda.synchronize`` around each run on CUDA). Inputs: fp32 on CPU,
bf16 on CUDA (``--dtype`` overrides); the same seeded inputs in every worker, all labels valid.
The parent checks that plain and fused agree: total, CE and distillation sums within a relative
1e-4 (fp32; 2e-3 for bf16) and the student gradients within a relative (Frobenius) 1e-4 (1e-2 bf16).

    python benchmarks/distill_loss.py                                 # CPU, 4096 x 512, V=32768,65536
    python benchmarks/distill_loss.py --quick                         # smoke test, ~30 s
    python benchmarks/distill_loss.py --device cuda --vocabs 32768,128256 --json out.json

The larger default vocabulary is 65,536, not LLaMA-3's 128,256: the plain implementation peaks at
~11.5 fp32 ``[tokens, vocab]`` buffers (5.5 GiB at 4096 x 32768), i.e. ~21.5 GiB at 128,256,
which does not fit next to anything else on a 24 GB CPU machine (and takes minutes per run on
2 cores). On CPU the parent skips ``plain`` (and says so) where that estimate exceeds 85% of
``MemAvailable``; fused and Liger still run there. On CUDA pass ``--vocabs 32768,128256``.

The synthetic inputs are seeded random hidden states and heads scaled to peaked distributions
(see :func:`make_inputs`), since the exp of the many tiny probabilities of a peaked
distribution is what dominates the elementwise cost on CPU. ``axolotl_focus/train/losses/`` is loaded
by path so that the workers do not import the package ``__init__`` (transformers, ~8 s).

Targets (FOCUS, per shape): peak loss memory fused / plain <= 0.15, time fused / plain <= 1.2,
time fused / Liger <= 1.0.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

IMPLS = ("plain", "fused", "liger")
MODES = ("focus", "kd")
TARGET_MEM, TARGET_TIME_PLAIN, TARGET_TIME_LIGER = 0.15, 1.2, 1.0
MIB = 2**20
# Peak of the plain implementation in [tokens, vocab] fp32 buffers, measured on CPU (FOCUS: 5652 MiB
# at 4096 x 32768, i.e. ~11); used only to skip it where it cannot fit.
PLAIN_FP32_BUFFERS = 11.5
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_losses():
    """The package ``axolotl_focus/train/losses/`` as a module, without the ``__init__`` of
    ``axolotl_focus`` (or ``axolotl_focus.train``).

    The ``axolotl_focus`` ``__init__`` imports transformers (~8 s per worker); the losses need only
    torch. Registered under its own name, so that its relative imports of its sibling modules
    resolve without importing the parent packages.
    """
    import importlib.util

    name = "axolotl_focus.train.losses"
    if name in sys.modules:
        return sys.modules[name]
    folder = os.path.join(REPO, "axolotl_focus", "train", "losses")
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
# worker
# --------------------------------------------------------------------------------------------


from peak_rss import reset_peak as _reset_hwm  # noqa: E402
from peak_rss import status_kb as _status_kb  # noqa: E402


def make_inputs(tokens: int, hidden: int, vocab: int, seed: int = 0, device: str = "cpu"):
    """Seeded student/teacher hidden states and heads (fp32); teacher = student + noise.

    Generated on ``device`` by its own generator: the same numbers in every worker of a device
    (not across devices), and no minutes of CPU ``randn`` at LLaMA-3 sizes on a GPU machine.

    Scaled so that the logits have a standard deviation of 5 (student) and 10 (teacher): at
    tau = 2 the teacher's top token has a median probability of about 0.3 over V = 32768, the
    student's (tau = 1) about the same, i.e. peaked distributions as from trained models, with
    most of the vocabulary at probabilities far below 1e-10.
    """
    import torch

    g = torch.Generator(device).manual_seed(seed)
    h_s = torch.randn(tokens, hidden, generator=g, device=device)
    w_unit = torch.randn(vocab, hidden, generator=g, device=device)
    h_t = torch.randn(tokens, hidden, generator=g, device=device).mul_(0.5).add_(h_s)  # variance 1.25
    w_t = torch.randn(vocab, hidden, generator=g, device=device).mul_(0.5).add_(w_unit).mul_(
        10.0 / (1.25 * hidden**0.5))
    w_s = w_unit.mul_(5.0 / hidden**0.5)
    labels = torch.randint(0, vocab, (tokens,), generator=g, device=device)
    return h_s, w_s, h_t, w_t, labels


def worker(args) -> None:
    import torch

    losses = load_losses()
    DistillSpec, FusedCEDistillLoss, reference_ce_distill = (
        losses.DistillSpec, losses.FusedCEDistillLoss, losses.reference_ce_distill)

    impl, mode = args.worker, args.mode
    if impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype)

    h_s, w_s, h_t, w_t, labels = (
        t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        for t in make_inputs(args.tokens, args.hidden, args.vocab, args.seed, args.device)
    )
    h_s.requires_grad_(True)
    w_s.requires_grad_(True)
    n = args.tokens
    spec = DistillSpec(mode=mode, temperature=args.temperature, beta=15.0, gamma=1.0)
    ce_scale, distill_scale = 1.0 / n, args.alpha / n

    if impl == "plain":

        def step():
            zs = h_s @ w_s.T
            with torch.no_grad():
                zt = h_t @ w_t.T
            ce, d = reference_ce_distill(zs, zt, labels, spec)
            total = ce_scale * ce + distill_scale * d
            total.backward()
            return total.detach(), ce.detach(), d.detach()

    elif impl == "fused":

        fused = FusedCEDistillLoss(spec, ce_weight=ce_scale, distill_weight=distill_scale, chunk_size=args.chunk_size)

        def step():
            total, sums = fused(h_s, w_s, labels, teacher_hidden=h_t, teacher_head=w_t)
            total.backward()
            return total.detach(), sums["ce"], sums["distill"]

    else:
        liger = LigerFusedLinearJSDLoss(
            weight_hard_loss=1.0, weight_soft_loss=args.alpha, beta=0.5, temperature=args.temperature,
            compiled=cuda and not args.liger_no_compile, chunk_size=args.chunk_size,
            return_soft_hard_loss=True,
        )

        def step():
            total, soft, hard = liger(h_s, w_s, h_t, w_t, labels)
            total.backward()
            return total.detach(), hard.detach() * n, soft.detach() * n

    def run_once():
        h_s.grad = None
        w_s.grad = None
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        method = "torch.cuda.max_memory_allocated - allocated after inputs"
    else:
        base_kb = _status_kb("VmRSS")
        if _reset_hwm():
            method = "peak RSS (VmHWM reset after inputs) - RSS after inputs"
        else:
            base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            method = "ru_maxrss - RSS after inputs (fallback: no clear_refs)"

    run_once()  # warm-up (also part of the peak: it is one more identical forward + backward)
    times, out = [], None
    for _ in range(args.repeats):
        dt, out = run_once()
        times.append(dt)

    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        hwm_kb = _status_kb("VmHWM") if method.startswith("peak RSS") else resource.getrusage(
            resource.RUSAGE_SELF).ru_maxrss
        peak = (hwm_kb - base_kb) * 1024

    total, ce, d = (float(x) for x in out)
    result = {
        "impl": impl, "mode": mode if impl != "liger" else "jsd", "tokens": n, "hidden": args.hidden,
        "vocab": args.vocab, "dtype": args.dtype, "device": args.device, "chunk_size": args.chunk_size,
        "peak_bytes": peak, "time_s": statistics.median(times), "times_s": times, "method": method,
        "total": total, "ce_sum": ce, "distill_sum": d,
    }
    if args.grad_dump:
        torch.save({"h": h_s.grad.float().cpu(), "w": w_s.grad.float().cpu()}, args.grad_dump)
    print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------
# parent
# --------------------------------------------------------------------------------------------


def run_worker(args, impl: str, mode: str, vocab: int, grad_dump: str | None) -> dict:
    cmd = [
        sys.executable, os.path.abspath(__file__), "--worker", impl, "--mode", mode,
        "--vocab", str(vocab), "--tokens", str(args.tokens), "--hidden", str(args.hidden),
        "--device", args.device, "--dtype", args.dtype, "--chunk-size", str(args.chunk_size),
        "--repeats", str(args.repeats), "--threads", str(args.threads), "--alpha", str(args.alpha),
        "--temperature", str(args.temperature), "--seed", str(args.seed),
    ]
    if grad_dump:
        cmd += ["--grad-dump", grad_dump]
    if args.liger_no_compile:
        cmd.append("--liger-no-compile")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        return {"impl": impl, "mode": mode, "vocab": vocab, "error": (out.stderr or out.stdout)[-2000:]
                or f"exit code {out.returncode}"}
    return json.loads(lines[-1])


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def compare(plain: dict, fused: dict, dumps: dict, fp32: bool) -> tuple[bool, str]:
    """Plain vs fused values and gradients, relative errors against the plain implementation."""
    import torch

    tol_val, tol_grad = (1e-4, 1e-4) if fp32 else (2e-3, 1e-2)
    errs = {k: _rel(fused[k], plain[k]) for k in ("total", "ce_sum", "distill_sum")}
    ok = all(e <= tol_val for e in errs.values())
    msg = ", ".join(f"{k} rel {e:.1e}" for k, e in errs.items())
    if dumps.get("plain") and dumps.get("fused") and os.path.exists(dumps["plain"]) and os.path.exists(dumps["fused"]):
        gp, gf = torch.load(dumps["plain"]), torch.load(dumps["fused"])
        for k in ("h", "w"):
            e = float((gf[k] - gp[k]).norm() / gp[k].norm().clamp_min(1e-30))
            ok &= e <= tol_grad
            msg += f", grad_{k} rel {e:.1e}"
    return ok, f"{msg} (tolerance {tol_val:g} values, {tol_grad:g} grads)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocabs", default="32768,65536", help="comma-separated vocabulary sizes")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="token chunk of fused and Liger (default: FusedCEDistillLoss's default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="focus,kd", help="distillation losses for plain/fused: focus,kd")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--alpha", type=float, default=0.05, help="weight of the distillation term")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per worker (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--liger-no-compile", action="store_true", help="Liger with compiled=False on CUDA too")
    parser.add_argument("--quick", action="store_true", help="smoke test: 512 tokens x 64 hidden x V=4096")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, default="focus", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--grad-dump", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    chunk_given = args.chunk_size is not None
    if args.chunk_size is None:
        import inspect

        args.chunk_size = inspect.signature(load_losses().FusedCEDistillLoss).parameters["chunk_size"].default
    if args.worker:
        return worker(args)
    if args.quick:
        args.tokens, args.hidden, args.vocabs = 512, 64, "4096"
        if not chunk_given:
            args.chunk_size = 128  # exercise the chunking (4 chunks)

    vocabs = [int(v) for v in args.vocabs.split(",") if v]
    modes = [m for m in args.modes.split(",") if m]
    impls = [i for i in args.impls.split(",") if i]
    results, checks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in vocabs:
            for mode in modes:
                dumps = {}
                for impl in impls:
                    if impl == "liger" and mode != modes[0]:
                        continue  # Liger computes JSD whatever the mode: one run per shape
                    dump = None
                    need = PLAIN_FP32_BUFFERS * args.tokens * vocab * 4
                    avail = _mem_available()
                    if impl == "plain" and args.device == "cpu" and avail and need > 0.85 * avail:
                        r = {"impl": impl, "mode": mode, "vocab": vocab,
                             "error": f"skipped: needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"}
                    else:
                        dump = os.path.join(tmp, f"{impl}_{mode}_{vocab}.pt") if impl in ("plain", "fused") else None
                        r = run_worker(args, impl, mode, vocab, dump)
                    results.append(r)
                    dumps[impl] = dump
                    if "error" in r:
                        what = "" if r["error"].startswith("skipped") else "FAILED: "
                        print(f"[{impl} {mode} V={vocab}] {what}{r['error']}", file=sys.stderr, flush=True)
                    else:
                        print(f"[{impl} {r['mode']} V={vocab}] peak {r['peak_bytes'] / MIB:.0f} MiB, "
                              f"median {r['time_s']:.2f} s", file=sys.stderr, flush=True)
                by = {r["impl"]: r for r in results if r["vocab"] == vocab and r.get("mode") == mode}
                if "plain" in by and "fused" in by and "error" not in by["plain"] and "error" not in by["fused"]:
                    ok, msg = compare(by["plain"], by["fused"], dumps, args.dtype == "float32")
                    checks.append({"vocab": vocab, "mode": mode, "ok": ok, "detail": msg})
                for path in dumps.values():
                    if path and os.path.exists(path):
                        os.remove(path)

    # ---- table
    ok_rows = [r for r in results if "error" not in r]
    plain_of = {(r["vocab"], r["mode"]): r for r in ok_rows if r["impl"] == "plain"}
    liger_of = {r["vocab"]: r for r in ok_rows if r["impl"] == "liger"}
    method = ok_rows[0]["method"] if ok_rows else "-"
    print(f"\nCE + distillation (alpha={args.alpha}, tau={args.temperature}, FOCUS beta=15 gamma=1), forward + "
          f"backward to student hidden + lm_head; device={args.device} dtype={args.dtype} "
          f"threads={args.threads} chunk_size={args.chunk_size}; median of {args.repeats} after 1 warm-up; "
          f"peak = {method}. Liger = LigerFusedLinearJSDLoss: JSD (beta=0.5) + CE, not FOCUS.\n")
    print("| implementation | loss | tokens | hidden | vocab | peak MiB | time s | mem / plain | time / plain |")
    print("|---|---|---|---|---|---|---|---|---|")
    names = {"plain": "plain (dense logits + autograd)", "fused": "fused_ce_distill (ours)",
             "liger": "Liger LigerFusedLinearJSDLoss"}
    for r in results:
        if "error" in r:
            what = "skipped" if r["error"].startswith("skipped") else "failed"
            print(f"| {names[r['impl']]} | CE + {r['mode'].upper()} | {args.tokens} | {args.hidden} | {r['vocab']} | "
                  f"{what} | {what} | - | - |")
            continue
        p = plain_of.get((r["vocab"], r["mode"] if r["impl"] != "liger" else modes[0]))
        mem_ratio = f"{r['peak_bytes'] / p['peak_bytes']:.3f}" if p else "-"
        time_ratio = f"{r['time_s'] / p['time_s']:.2f}" if p else "-"
        label = f"CE + {r['mode'].upper()}"
        print(f"| {names[r['impl']]} | {label} | {r['tokens']} | {r['hidden']} | {r['vocab']} | "
              f"{r['peak_bytes'] / MIB:.0f} | {r['time_s']:.2f} | {mem_ratio} | {time_ratio} |")

    # ---- targets
    print()
    targets = []
    for r in ok_rows:
        if r["impl"] != "fused":
            continue
        key = f"V={r['vocab']} {r['mode']}"
        p = plain_of.get((r["vocab"], r["mode"]))
        if p:
            m, t = r["peak_bytes"] / p["peak_bytes"], r["time_s"] / p["time_s"]
            targets.append((f"{key} mem fused/plain {m:.3f} <= {TARGET_MEM}", m <= TARGET_MEM))
            targets.append((f"{key} time fused/plain {t:.2f} <= {TARGET_TIME_PLAIN}", t <= TARGET_TIME_PLAIN))
        lg = liger_of.get(r["vocab"])
        if lg:
            t = r["time_s"] / lg["time_s"]
            targets.append((f"{key} time fused/Liger(JSD) {t:.2f} <= {TARGET_TIME_LIGER}", t <= TARGET_TIME_LIGER))
    for c in checks:
        targets.append((f"V={c['vocab']} {c['mode']} fused == plain: {c['detail']}", c["ok"]))
    for text, ok in targets:
        print(f"- {'PASS' if ok else 'FAIL'}: {text}")
    for r in results:
        if "error" in r:
            print(f"- {'NOTE' if r['error'].startswith('skipped') else 'FAIL'}: {r['impl']} {r['mode']} "
                  f"V={r['vocab']}: {r['error'].strip().splitlines()[-1]}")
    failed = [r for r in results if "error" in r and not r["error"].startswith("skipped")]
    all_ok = bool(targets) and all(ok for _, ok in targets) and not failed
    print(f"Targets: {'PASS' if all_ok else 'FAIL'}")
    if args.quick:
        print("(--quick: smoke-test shapes, dominated by fixed per-call costs; the targets apply to the full shapes)")

    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k not in ("worker", "mode", "vocab",
                                                                              "grad_dump")},
                       "results": results, "checks": checks,
                       "targets": [{"check": t, "pass": ok} for t, ok in targets], "pass": all_ok}, f, indent=1)
    if failed or not all(c["ok"] for c in checks):
        sys.exit(1)  # a wrong result or a crashed worker; unmet speed/memory targets are reported above


if __name__ == "__main__":
    main()
