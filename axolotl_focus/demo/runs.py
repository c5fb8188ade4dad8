"""The `axolotl train` runs of the demo: subprocesses with their logs, the per-step dicts parsed
from them, the thread pool that keeps runs on the same dataset apart, and the thread / job counts."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from .settings import DemoError


def logged_dicts(text: str) -> list[dict[str, float]]:
    """The per-step dicts the HF Trainer prints (``{'loss': ...}``), values as floats."""
    out = []
    for match in re.finditer(r"\{'loss': [^{}]*\}", text):
        try:
            raw = ast.literal_eval(match.group(0))
        except (ValueError, SyntaxError):
            continue
        row = {}
        for key, value in raw.items():
            try:
                row[key] = float(value)
            except (TypeError, ValueError):
                pass
        out.append(row)
    return out


def axolotl_env(threads: int, device: str = "cpu") -> dict[str, str]:
    bindir = os.path.dirname(sys.executable)
    env = dict(
        os.environ, AXOLOTL_DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE",
        PATH=bindir + os.pathsep + os.environ.get("PATH", ""),
    )
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a GPU machine asked to run on the CPU
    return env


def run_concurrently(items: list, work: Callable, jobs: int, dataset_key: Callable):
    """Yield ``(item[0], work(*item, slot))`` as each finishes, at most ``jobs`` at a time. Two
    items with the same ``dataset_key`` never start together until one of them has finished (the
    first prepares the shared axolotl dataset cache, the next reuses it); otherwise in order."""
    pending, running, prepared = list(items), {}, set()
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        while pending or running:
            busy = {dataset_key(item) for item, _ in running.values()}
            for item in list(pending):
                if len(running) >= jobs:
                    break
                key = dataset_key(item)
                if key in busy and key not in prepared:
                    continue
                slot = min(set(range(jobs)) - {slot for _, slot in running.values()})
                running[pool.submit(work, *item, slot)] = (item, slot)
                pending.remove(item)
                busy.add(key)
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                item, _ = running.pop(future)
                prepared.add(dataset_key(item))
                yield item[0], future.result()


def run_logged(cmd: list[str], log: Path, env: dict[str, str], cwd: Path,
               on_line: Callable[[str], None] | None = None) -> None:
    """Run ``cmd`` with stdout and stderr into ``log`` (``on_line`` sees each line); raises
    :class:`DemoError` with the log's tail when it fails."""
    with open(log, "w", encoding="utf-8") as handle:
        handle.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, env=env, cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace")
        assert proc.stdout is not None
        for line in proc.stdout:
            handle.write(line)
            if on_line is not None:
                on_line(line)
        code = proc.wait()
    if code != 0:
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(True)[-30:])
        raise DemoError(f"{' '.join(cmd[:3])} ... failed (exit {code}); log: {log}\n{tail}")


def axolotl_train(config: Path, log: Path, steps: int, desc: str, threads: int, progress: bool,
                  position: int = 0, device: str = "cpu") -> list[dict]:
    """``axolotl train CONFIG --launcher python`` in a subprocess (log to ``log``); a progress bar
    follows the logged steps. Returns the logged dicts; raises :class:`DemoError` on failure."""
    env = axolotl_env(threads, device)
    exe = shutil.which("axolotl", path=env["PATH"])
    if exe is None:
        raise DemoError("the `axolotl` command is not installed in this environment (pip install axolotl)")
    rows: list[dict] = []
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not progress, leave=False, position=position)

    def on_line(line: str) -> None:
        for row in logged_dicts(line):
            rows.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", refresh=False)

    try:
        run_logged([exe, "train", str(config), "--launcher", "python"], log, env, config.parent, on_line)
    finally:
        bar.close()
    return rows




def auto_threads() -> int:
    """Torch threads: the cores not busy by the 1-minute load average, leaving one core free, at
    least 1. On a shared machine, OpenMP threads spinning on the same cores as another process slow
    both down many times over (measured here: 2 threads on 2 shared cores ran a micro model's
    pretraining steps 13x and evaluation 4x slower than 1 thread), and another job may start after the demo did."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return max(1, min(cores - 1, cores - int(load + 0.5)))


def auto_jobs() -> int:
    """``axolotl train`` runs at a time: 2 on a machine with two cores or more, else 1. Each run
    spends most of its time in axolotl's single-threaded start-up, and with one torch thread per
    run (OpenMP threads do not spin when idle: ``OMP_WAIT_POLICY=PASSIVE``) two runs share two
    cores well even when the machine is busy; the load average is no guide here, since it counts
    the demo's own previous stage."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1
