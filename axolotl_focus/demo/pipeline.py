"""The demo's frame: a stage is a plain function listed in a table (:class:`Stage`), run or reused by
:class:`Demo` with the stage cache.

A stage function is ``run(settings, ctx, folder, records) -> (data, summary)``: ``records`` maps every
finished earlier stage to the ``data`` of its ``done.json`` (paths, counts, timings); the function
writes its outputs into ``folder`` and returns its own ``data`` (which becomes its record) and a
one-line summary. :class:`Context` says how this invocation runs (threads, jobs, device, output),
which never enters a stage's key.

Caching: a stage's folder holds ``started.json`` (its key) while it runs and ``done.json`` (key, a
fresh id, summary, data, wall time) once its outputs are complete, written last and atomically. A
stage's key hashes its settings (:meth:`DemoSettings.stage_settings`), the output folder and the ids
of the stages it ``needs``, so a stage that is redone invalidates everything that reads it. A rerun
reuses every stage whose ``done.json`` matches; an interrupted stage restarts from an empty folder,
except the ``resumable`` ones, which keep the finished parts of an attempt with the same key.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..files import digest, read_json
from .runs import auto_jobs, auto_threads
from .settings import DemoSettings, fmt_time, write_json


@dataclass(frozen=True)
class Context:
    """How this invocation runs; not part of any stage key (a device or thread count changes speed,
    not what is computed, up to rounding)."""

    out: Path
    threads: int = 1
    jobs: int = 1
    device: str = "cpu"
    progress: bool = True
    echo: Callable[[str], None] = print


@dataclass(frozen=True)
class Stage:
    name: str
    title: str
    needs: tuple[str, ...]  # the stages whose records it reads (their ids enter its key)
    run: Callable[[DemoSettings, Context, Path, dict], tuple[dict, str]]
    resumable: bool = False  # an interrupted attempt with the same key keeps its finished parts


def stage_dir(out: Path, table: tuple[Stage, ...], name: str) -> Path:
    return Path(out) / f"{[st.name for st in table].index(name) + 1}_{name}"


def marker(out: Path, table: tuple[Stage, ...], name: str) -> dict | None:
    """The ``done.json`` of a finished stage, or None."""
    return read_json(stage_dir(out, table, name) / "done.json")


def records(out: Path, table: tuple[Stage, ...]) -> dict[str, dict]:
    """``{stage: data}`` of every finished stage in ``out``."""
    return {st.name: m["data"] for st in table if (m := marker(out, table, st.name))}


class Demo:
    """Runs (or reuses) the stages of ``table`` into ``out``, then writes the report."""

    def __init__(self, out: str | os.PathLike, settings: DemoSettings, table: tuple[Stage, ...], *,
                 report: Callable[[DemoSettings, Context, dict, float | None], Path],
                 force: bool | tuple[str, ...] = False, progress: bool = True, threads: int | None = None,
                 jobs: int | None = None, echo: Callable[[str], None] | None = None, device: str | None = None,
                 until: str | None = None):
        names = [st.name for st in table]
        if until is not None and until not in names:
            raise ValueError(f"--until: unknown stage {until!r}; stages are {names}")
        self.until = until
        self.force = set(names) if force is True else set(force or ())
        unknown = self.force - set(names)
        if unknown:
            raise ValueError(f"--force: unknown stage(s) {sorted(unknown)}; stages are {names}")
        for name, value in (("threads", threads), ("jobs", jobs)):
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be at least 1, got {value}")
        if (device or "cpu") not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {device!r}")
        self.s, self.table, self.report = settings, table, report
        self.ctx = Context(Path(out).absolute(), threads or auto_threads(), jobs or auto_jobs(), device or "cpu",
                           progress, echo or (lambda msg: print(msg, flush=True)))
        self.status: dict[str, str] = {}

    def dir(self, name: str) -> Path:
        return stage_dir(self.ctx.out, self.table, name)

    def key(self, stage: Stage) -> str:
        deps = {d: (marker(self.ctx.out, self.table, d) or {}).get("id") for d in stage.needs}
        return digest({"stage": stage.name, "settings": self.s.stage_settings(stage.name), "out": str(self.ctx.out),
                       "deps": deps})

    def run(self) -> Path:
        """Run (or reuse) every stage, then write the report. Returns the report's path."""
        import torch  # heavy: `demo --help` imports no torch

        torch.set_num_threads(self.ctx.threads)
        ctx, start = self.ctx, time.perf_counter()
        ctx.out.mkdir(parents=True, exist_ok=True)
        ctx.echo(f"axolotl-focus demo ({self.s.model}, {self.s.preset}) -> {ctx.out}  [{os.cpu_count()} CPU cores, "
                 f"torch threads {ctx.threads}, device {ctx.device}]")
        for i, stage in enumerate(self.table, 1):
            self._stage(i, stage)
            if stage.name == self.until:
                ctx.echo(f"stopping after {stage.name} (--until)")
                break
        path = self.report(self.s, ctx, self.status, time.perf_counter() - start)
        reused = sum(v == "reused" for v in self.status.values())
        ctx.echo(f"report: {path}  ({fmt_time(time.perf_counter() - start)}; {reused} of {len(self.table)} stages "
                 "reused)")
        return path

    def _stage(self, i: int, stage: Stage) -> None:
        ctx, folder, key = self.ctx, self.dir(stage.name), self.key(stage)
        head = f"[{i}/{len(self.table)}] {stage.name}"
        done = marker(ctx.out, self.table, stage.name)
        if done and done.get("key") == key and stage.name not in self.force:
            self.status[stage.name] = "reused"
            ctx.echo(f"{head}: reused ({done['summary']})")
            return
        started = read_json(folder / "started.json")
        if stage.name in self.force or not started or started.get("key") != key or not stage.resumable:
            shutil.rmtree(folder, ignore_errors=True)  # stale or partial outputs of other settings
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "done.json").unlink(missing_ok=True)
        write_json(folder / "started.json", {"key": key, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        ctx.echo(f"{head}: {stage.title} ...")
        t0 = time.perf_counter()
        data, summary = stage.run(self.s, ctx, folder, records(ctx.out, self.table))
        elapsed = time.perf_counter() - t0
        write_json(folder / "done.json", {"key": key, "id": uuid.uuid4().hex, "stage": stage.name, "summary": summary,
                                          "data": data, "elapsed_s": round(elapsed, 1), "threads": ctx.threads,
                                          "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        self.status[stage.name] = "ran"
        ctx.echo(f"{head}: done in {fmt_time(elapsed)} - {summary}")
