"""The demo pipeline's frame: :class:`DemoBase` holds the settings, the stage folders and their
paths, the stage cache (keys, ``started.json`` / ``done.json``) and the run loop; the stages
themselves are the mixins of this package, one module per stage."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

from ... import files
from ...files import digest, read_json
from ..report import render_report
from ..runs import auto_jobs, auto_threads
from ..settings import (
    DEPENDS,
    REPORT,
    RESUMABLE,
    STAGE_TITLES,
    STAGES,
    DemoSettings,
    fmt_time,
    write_json,
)


class DemoBase:
    """Runs the stages into ``out`` (see :mod:`axolotl_focus.demo`); each ``_run_<stage>(folder)``
    comes from a stage mixin and returns ``(data, summary)``."""

    def __init__(self, out: str | os.PathLike, settings: DemoSettings, *, force: bool | tuple[str, ...] = False,
                 progress: bool = True, threads: int | None = None, jobs: int | None = None,
                 echo: Callable[[str], None] | None = None, device: str | None = None):
        self.out = Path(out).absolute()
        self.s = settings
        if force is True:
            self.force = set(STAGES)
        else:
            self.force = set(force or ())
        unknown = self.force - set(STAGES)
        if unknown:
            raise ValueError(f"--force: unknown stage(s) {sorted(unknown)}; stages are {list(STAGES)}")
        self.progress = progress
        for name, value in (("threads", threads), ("jobs", jobs)):
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be at least 1, got {value}")
        self.threads = threads or auto_threads()
        self.jobs = jobs or auto_jobs()
        self.echo = echo or (lambda msg: print(msg, flush=True))
        self.status: dict[str, str] = {}
        # not part of any stage key: a device changes speed, not what is computed (up to rounding)
        self.device = device or "cpu"
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")

    # paths -----------------------------------------------------------------------------------
    def dir(self, stage: str) -> Path:
        return self.out / f"{STAGES.index(stage) + 1}_{stage}"

    @property
    def teacher(self) -> str:
        if self.s.real:  # materialized in the package cache, shared by every demo folder
            recorded = ((self.marker("teacher") or {}).get("data") or {}).get("path")
            if recorded:
                return recorded
            from ...embedded_model import default_path

            return str(default_path())
        return str(self.dir("teacher") / "model")

    def pruned(self, kind: str) -> str:
        return str(self.dir("prune") / kind)

    @property
    def pairs_file(self) -> str:
        return str(self.dir("pairs") / "pairs.jsonl")

    def run_dir(self, run: str) -> str:
        return str(self.dir("train") / run)

    def trained(self, run: str) -> str:
        """The model a run produced (its merged folder for LoRA runs)."""
        return str(Path(self.run_dir(run)) / "merged") if self.s.train_lora_r else self.run_dir(run)

    # caching ---------------------------------------------------------------------------------
    def marker(self, stage: str) -> dict | None:
        return read_json(self.dir(stage) / "done.json")

    def key(self, stage: str) -> str:
        deps = {d: (self.marker(d) or {}).get("id") for d in DEPENDS[stage]}
        return digest({"stage": stage, "settings": self.s.stage_settings(stage), "out": str(self.out), "deps": deps})

    def run(self) -> Path:
        """Run (or reuse) every stage, then write the report. Returns the report's path."""
        import torch

        torch.set_num_threads(self.threads)
        self.out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        self.echo(f"axolotl-focus demo ({self.s.model}, {self.s.preset}) -> {self.out}  "
                  f"[{os.cpu_count()} CPU cores, torch threads {self.threads}, device {self.device}]")
        for i, stage in enumerate(STAGES, 1):
            self._stage(i, stage)
        path = self.write_report(time.perf_counter() - start)
        reused = sum(v == "reused" for v in self.status.values())
        self.echo(f"report: {path}  ({fmt_time(time.perf_counter() - start)}; {reused} of {len(STAGES)} stages "
                  "reused)")
        return path

    def _stage(self, i: int, stage: str) -> None:
        folder, key = self.dir(stage), self.key(stage)
        head = f"[{i}/{len(STAGES)}] {stage}"
        done = self.marker(stage)
        if done and done.get("key") == key and stage not in self.force:
            self.status[stage] = "reused"
            self.echo(f"{head}: reused ({done['summary']})")
            return
        started = read_json(folder / "started.json")
        if stage in self.force or not started or started.get("key") != key or stage not in RESUMABLE:
            shutil.rmtree(folder, ignore_errors=True)  # stale or partial outputs of other settings
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "done.json").unlink(missing_ok=True)
        write_json(folder / "started.json", {"key": key, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        self.echo(f"{head}: {STAGE_TITLES[stage]} ...")
        t0 = time.perf_counter()
        data, summary = getattr(self, f"_run_{stage}")(folder)
        elapsed = time.perf_counter() - t0
        write_json(folder / "done.json", {"key": key, "id": uuid.uuid4().hex, "stage": stage, "summary": summary,
                                          "data": data, "elapsed_s": round(elapsed, 1), "threads": self.threads,
                                          "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        self.status[stage] = "ran"
        self.echo(f"{head}: done in {fmt_time(elapsed)} - {summary}")

    # report ----------------------------------------------------------------------------------
    def write_report(self, total_s: float | None = None) -> Path:
        path = self.out / REPORT
        files.write_text(path, render_report(self, total_s))
        return path

