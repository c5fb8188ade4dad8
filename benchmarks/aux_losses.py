"""Baseline loss terms (unlikelihood, ScaleGrad, TaiLr, DITTO), forward + backward: fused vs dense.

For each term, three measurements side by side in one run, each differentiated to the student
hidden states ``[tokens, hidden]`` and lm_head ``[vocab, hidden]``:

* ``ce``: the fused CE pass alone (:class:`axolotl_focus.train.losses.FusedCEDistillLoss` with no aux
  term, no teacher): the cost of plain training, the reference for the overhead of a term.
* ``fused``: the term as the trainer computes it. UL / ScaleGrad / TaiLr: the same fused pass
  with the term (per-sequence seen-token ids, ``[chunk, K]``). DITTO:
  :func:`~axolotl_focus.train.losses.fused_ditto_loss` (gradients computed in the forward chunks).
* ``dense``: the naive implementation: full ``[tokens, vocab]`` logits and autograd.
  UL / ScaleGrad / TaiLr: CE or the term from
  :func:`~axolotl_focus.train.losses.reference_aux_terms`, with the seen-token mask built the naive
  vectorized way (a one-hot ``[tokens, vocab]`` cumulative sum per sequence, as the reference
  codes' ``[b, l, V]`` tensors) and counted in the measurement; DITTO: ``log_softmax`` of the full
  logits, gathered gold probabilities, :func:`~axolotl_focus.train.losses.ditto_loss`.

Objectives (all normalized by the number of tokens): UL ``CE + 0.5 UL``, ScaleGrad (gamma 0.5),
TaiLr (gamma 0.1, min_weight 0.2), DITTO (lambda 0.5) on pseudo-repetition rows (a 32-token unit
repeated after a 16-token prefix). Targets of UL / ScaleGrad / TaiLr are Zipf-distributed
(s = 1.1) so that tokens repeat within a row as in text (a few hundred distinct per 512).

Every (implementation, term) runs in its own subprocess. Peak memory is measured as in
``distill_loss.py`` (CPU: ``VmHWM`` reset after the inputs exist, glibc told to return freed
memory; CUDA: ``max_memory_allocated``) over the first (warm-up) forward + backward; ``mem / CE``
divides by the peak of the CE-alone worker. Time is the median of ``--repeats`` runs; each
fused/dense worker interleaves its runs with CE-alone runs on the same inputs, so that ``time / CE``
compares runs made side by side (the machine's load may change between workers), and
``time / dense`` is the ratio of the two workers' ``time / CE``. The parent checks fused against
dense: values within a relative 1e-4 and gradients within a relative (Frobenius) 1e-4 (fp32).

    python benchmarks/aux_losses.py                  # CPU: 4096 tokens (8 rows x 512), H=512, V=32768
    python benchmarks/aux_losses.py --quick          # smoke test: 1024 tokens, H=64, V=4096
    python benchmarks/aux_losses.py --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from distill_loss import MIB, _rel, load_losses, make_inputs  # noqa: E402 (benchmarks/ is on sys.path)
from peak_rss import reset_peak, status_kb  # noqa: E402

TERMS = ("ul", "scalegrad", "tailr", "ditto")
IMPLS = ("ce", "fused", "dense")
DITTO_PREFIX, DITTO_UNIT = 16, 32


def make_targets(tokens: int, vocab: int, seq_len: int, term: str, seed: int = 0):
    """``(labels [N], sequence [N])``: Zipf targets per row, or DITTO's pseudo-repetition rows
    (labels of the copies; the prefix positions are -100)."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    rows = tokens // seq_len
    sequence = torch.arange(rows).repeat_interleave(seq_len)
    if term == "ditto":
        unit = torch.randint(0, vocab, (rows, DITTO_UNIT), generator=g)
        labels = unit.repeat(1, seq_len // DITTO_UNIT + 1)[:, :seq_len].clone()
        labels[:, :DITTO_PREFIX] = -100
        return labels.flatten(), sequence
    weights = torch.arange(1, vocab + 1, dtype=torch.float64).pow(-1.1)
    labels = torch.randperm(vocab, generator=g)[torch.multinomial(weights, tokens, True, generator=g)]
    return labels, sequence


def dense_seen_mask(labels, sequence, vocab: int, seq_len: int):
    """Naive ``[N, V]`` mask of earlier targets per sequence (equal-length rows): one-hot cumsum."""
    import torch

    onehot = torch.zeros(labels.numel(), vocab, dtype=torch.int16)
    onehot[torch.arange(labels.numel()), labels.clamp(min=0)] = (labels >= 0).to(torch.int16)
    onehot = onehot.view(-1, seq_len, vocab)
    return (onehot.cumsum(1, dtype=torch.int16) - onehot).view(-1, vocab) > 0


def worker(args) -> None:
    import torch

    losses = load_losses()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    h, w, _, _, _ = make_inputs(args.tokens, args.hidden, args.vocab, args.seed)
    labels, sequence = make_targets(args.tokens, args.vocab, args.seq_len, args.term, args.seed)
    h, w, labels, sequence = (t.to(device) for t in (h, w, labels, sequence))
    h.requires_grad_(True)
    w.requires_grad_(True)
    n = args.tokens
    aux = {"ul": losses.AuxSpec(unlikelihood=0.5), "scalegrad": losses.AuxSpec(scalegrad=0.5),
           "tailr": losses.AuxSpec(tailr=(0.1, 0.2)), "ditto": None}[args.term]
    spec = losses.DistillSpec("none")
    valid = labels != -100
    unit_len = torch.full((n // args.seq_len,), DITTO_UNIT, device=device)
    previous = losses.ditto_previous_index(sequence[valid], unit_len)

    def step(impl):
        if impl == "ce" or (impl == "fused" and args.term != "ditto"):
            fused = losses.FusedCEDistillLoss(spec, aux=aux if impl == "fused" else None, distill_weight=0.0,
                                              chunk_size=args.chunk_size)
            total, sums = fused(h[valid], w, labels[valid], sequence=sequence[valid], scale=1.0 / n)
            value = sums.get(args.term, sums["ce"])
        elif impl == "fused":  # DITTO
            value, count = losses.fused_ditto_loss(h[valid], w, labels[valid], previous, 0.5, args.chunk_size)
            total = value / count
        elif args.term == "ditto":
            log_p = torch.log_softmax((h[valid] @ w.T).float(), -1)
            value, count = losses.ditto_loss(-log_p.gather(1, labels[valid, None]).squeeze(1), previous, 0.5)
            total = value / count
        else:
            logits = h @ w.T
            seen = dense_seen_mask(labels, sequence, args.vocab, args.seq_len)
            terms = losses.reference_aux_terms(logits, labels, sequence, aux, seen=seen)
            if args.term == "ul":
                ce = torch.nn.functional.cross_entropy(logits, labels, reduction="sum", ignore_index=-100)
                total, value = (ce + 0.5 * terms["ul"]) / n, terms["ul"]
            else:
                total = terms[args.term] / n
                value = terms[args.term]
        total.backward()
        return float(total), float(value)

    def run_once(impl):
        h.grad = w.grad = None
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = step(impl)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    gc.collect()
    if cuda:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        method = "torch.cuda.max_memory_allocated - allocated after inputs"
    else:
        base = status_kb("VmRSS") * 1024
        method = "peak RSS (VmHWM reset after inputs) - RSS after inputs" if reset_peak() else "unavailable"
    run_once(args.worker)  # warm-up; the peak is that of this one forward + backward
    peak = torch.cuda.max_memory_allocated() - base if cuda else status_kb("VmHWM") * 1024 - base
    # timing: the term's runs interleaved with CE-alone runs, so that load changes hit both alike
    if args.worker != "ce":
        run_once("ce")
    times, times_ce, out = [], [], None
    for _ in range(args.repeats):
        if args.worker != "ce":
            times_ce.append(run_once("ce")[0])
        dt, out = run_once(args.worker)
        times.append(dt)
    if args.grad_dump:  # the last run was the term's
        torch.save({"h": h.grad.float().cpu(), "w": w.grad.float().cpu()}, args.grad_dump)
    print(json.dumps({"impl": args.worker, "term": args.term, "peak_bytes": peak, "time_s": statistics.median(times),
                      "times_s": times, "time_ce_s": statistics.median(times_ce or times), "times_ce_s": times_ce,
                      "method": method, "total": out[0], "value": out[1]}), flush=True)


def run_worker(args, impl: str, term: str, grad_dump: str | None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--term", term]
    for key in ("tokens", "hidden", "vocab", "seq_len", "chunk_size", "repeats", "threads", "seed", "device"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if grad_dump:
        cmd += ["--grad-dump", grad_dump]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        return {"impl": impl, "term": term, "error": (out.stderr or out.stdout)[-2000:] or f"exit {out.returncode}"}
    return json.loads(lines[-1])


def check(fused: dict, dense: dict, dumps: dict) -> tuple[bool, str]:
    import torch

    errs = {k: _rel(fused[k], dense[k]) for k in ("total", "value")}
    if all(os.path.exists(p) for p in dumps.values()):
        gf, gd = torch.load(dumps["fused"]), torch.load(dumps["dense"])
        errs.update({f"grad_{k}": float((gf[k] - gd[k]).norm() / gd[k].norm().clamp_min(1e-30)) for k in ("h", "w")})
    return all(e <= 1e-4 for e in errs.values()), ", ".join(f"{k} rel {e:.1e}" for k, e in errs.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per row (sequence)")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per worker (1: stable timings on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--terms", default=",".join(TERMS))
    parser.add_argument("--quick", action="store_true", help="smoke test: 1024 tokens x 64 hidden x V=4096")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--term", choices=TERMS, help=argparse.SUPPRESS)
    parser.add_argument("--grad-dump", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.tokens, args.hidden, args.vocab, args.seq_len, args.chunk_size, args.repeats = 1024, 64, 4096, 256, 256, 2
    if args.tokens % args.seq_len:
        parser.error("--tokens must be a multiple of --seq-len")
    terms = [t for t in args.terms.split(",") if t]
    results, checks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for term in terms:
            dumps = {impl: os.path.join(tmp, f"{impl}_{term}.pt") for impl in ("fused", "dense")}
            for impl in IMPLS:
                if impl == "ce" and term != terms[0] and term != "ditto":
                    continue  # the CE pass does not depend on the term (DITTO has other targets)
                r = run_worker(args, impl, term, dumps.get(impl))
                results.append(r)
                note = r.get("error", "").strip().splitlines()[-1:] or [
                    f"peak {r['peak_bytes'] / MIB:.0f} MiB, median {r['time_s']:.2f} s"]
                print(f"[{impl} {term}] {note[0]}", file=sys.stderr, flush=True)
            by = {r["impl"]: r for r in results if r["term"] == term and "error" not in r}
            if "fused" in by and "dense" in by:
                ok, msg = check(by["fused"], by["dense"], dumps)
                checks.append({"term": term, "ok": ok, "detail": msg})

    ok_rows = [r for r in results if "error" not in r]
    dense_of = {r["term"]: r for r in ok_rows if r["impl"] == "dense"}
    print(f"\nForward + backward to hidden states + lm_head; {args.tokens} tokens "
          f"({args.tokens // args.seq_len} rows x "
          f"{args.seq_len}), hidden {args.hidden}, vocab {args.vocab}, fp32, device={args.device}, "
          f"threads={args.threads}, chunk {args.chunk_size}; median of {args.repeats} after 1 warm-up; "
          f"peak = {ok_rows[0]['method'] if ok_rows else '-'}.\n")
    print("| term | implementation | peak MiB | time s | mem / CE | time / CE | mem / dense | time / dense |")
    print("|---|---|---|---|---|---|---|---|")
    names = {"ce": "CE alone (fused, no term)", "fused": "fused (ours)", "dense": "naive dense"}
    group = lambda term: "ditto" if term == "ditto" else "zipf"  # noqa: E731 (CE runs once per target kind)
    ce_of = {group(r["term"]): r for r in ok_rows if r["impl"] == "ce"}

    def cells(r, ce, dense):
        if r["impl"] == "ce":
            return ["-"] * 4
        rel = r["time_s"] / r["time_ce_s"]
        out = [f"{r['peak_bytes'] / ce['peak_bytes']:.2f}" if ce else "-", f"{rel:.2f}"]
        if dense is None or dense is r:
            return out + ["-", "-"]
        return out + [f"{r['peak_bytes'] / dense['peak_bytes']:.2f}",
                      f"{rel / (dense['time_s'] / dense['time_ce_s']):.2f}"]

    for r in results:
        label = f"CE ({'DITTO rows' if r['term'] == 'ditto' else 'Zipf targets'})" if r["impl"] == "ce" else r["term"]
        if "error" in r:
            print(f"| {label} | {names[r['impl']]} | failed | failed | - | - | - | - |")
            continue
        row = cells(r, ce_of.get(group(r["term"])), dense_of.get(r["term"]))
        print(f"| {label} | {names[r['impl']]} | {r['peak_bytes'] / MIB:.0f} | {r['time_s']:.2f} | {' | '.join(row)} |")
    print()
    for c in checks:
        print(f"- {'PASS' if c['ok'] else 'FAIL'}: {c['term']} fused == dense: {c['detail']}")
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"- FAIL: {r['impl']} {r['term']}: {r['error'].strip().splitlines()[-1]}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k not in ("worker", "term", "grad_dump")},
                       "results": results, "checks": checks}, f, indent=1)
    if failed or not all(c["ok"] for c in checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
