"""The demo pipeline: :class:`Demo` runs (or reuses) the six stages into its output folder
(see :mod:`axolotl_focus.demo`)."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from .. import files
from ..files import digest, read_json
from .report import decoding_key, flat_metrics, render_report
from .runs import auto_jobs, auto_threads, axolotl_env, axolotl_train, run_concurrently, run_logged
from .settings import (
    DEPENDS,
    REPORT,
    RESUMABLE,
    RUNS,
    STAGE_TITLES,
    STAGES,
    DemoError,
    DemoSettings,
    cache_dir,
    fmt_time,
    train_configs,
    write_json,
)


class Demo:
    """Runs the stages into ``out`` (see the module docstring)."""

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
            from ..embedded_model import default_path

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

    # 1. teacher ------------------------------------------------------------------------------
    def _run_teacher(self, folder: Path):
        if self.s.real:
            return self._run_real_teacher(folder)
        from ..micro import build_micro_teacher

        s = self.s
        model_dir = folder / "model"
        _, losses = build_micro_teacher(
            model_dir, steps=s.teacher_steps, seed=s.seed, vocab_size=s.vocab_size, layers=s.teacher_layers,
            hidden=s.teacher_hidden, heads=s.teacher_heads, kv_heads=s.teacher_kv_heads,
            intermediate=s.teacher_intermediate, progress=self.progress)
        write_json(folder / "pretrain_loss.json", losses)
        params = _param_count(model_dir)
        k = max(1, min(10, len(losses) // 10))
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        data = {"path": str(model_dir), "params": params, "loss_first": first, "loss_last": last,
                "steps": s.teacher_steps}
        summary = (f"{params / 1e6:.2f} M params ({s.teacher_layers} layers, hidden {s.teacher_hidden}, GQA "
                   f"{s.teacher_heads}/{s.teacher_kv_heads} heads), loss {first:.2f} -> {last:.2f} in "
                   f"{s.teacher_steps} steps")
        return data, summary

    def _run_real_teacher(self, folder: Path):
        from ..embedded_model import RECORD, materialize

        path = materialize()
        record = read_json(path / RECORD) or {}
        data = {"path": str(path), "params": record.get("parameters") or _param_count(path), "record": record}
        summary = (f"SmolLM2-135M-Instruct at {path} ({data['params'] / 1e6:.1f} M params, 30 layers, GQA 9/3 heads; "
                   f"from {record.get('wheel')})")
        return data, summary

    # 2. pruning ------------------------------------------------------------------------------
    def _run_prune(self, folder: Path):
        from ..config import FocusPruneArgs
        from ..preprocess import run_prune

        s = self.s
        layers = _num_layers(self.teacher)
        span = list(s.width_layers or (1, layers - 1))
        specs = {
            "width": FocusPruneArgs(target_param_reduction=s.width_reduction, attn_layers=span, mlp_layers=span,
                                    gqa_mode=s.width_gqa_mode, calib_samples=s.calib_samples, seed=s.seed,
                                    device=self.device),
            "depth": FocusPruneArgs(method="depth", num_blocks=s.depth_blocks, protected_first=1, protected_last=1,
                                    calib_samples=s.calib_samples, seed=s.seed, device=self.device),
        }
        data, parts = {}, []
        for kind, spec in specs.items():
            report = run_prune(self.teacher, spec, folder / kind)
            data[kind] = {"path": str(folder / kind), "params_before": report["params_before"],
                          "params_after": report["params_after"], "reduction": report["achieved_reduction"],
                          "removed_blocks": report.get("removed_blocks"), "layer_shapes": report.get("layer_shapes"),
                          "spec": spec.model_dump(exclude={"cache_dir", "wait_timeout"})}
            extra = f", blocks {report['removed_blocks']} removed" if report.get("removed_blocks") else \
                f", layers {span[0]}-{span[1] - 1}"
            parts.append(f"{kind} {report['params_after'] / 1e6:.2f} M ({report['achieved_reduction']:.1%} "
                         f"fewer{extra})")
        return data, "; ".join(parts)

    # 3. Table 1 ------------------------------------------------------------------------------
    def _table1_prompts(self):
        from transformers import AutoTokenizer

        from ..table1 import prefixes

        tokenizer = AutoTokenizer.from_pretrained(self.teacher)
        return prefixes(tokenizer, self.s.table1_prompts, self.s.table1_prefix_tokens)

    def _run_table1(self, folder: Path):
        from ..table1 import measure

        s = self.s
        if not s.table1_prompts:
            return {"in_eval": True}, "measured in the evaluation stage (same documents, every decoding and seed)"
        prompts = self._table1_prompts()
        models = {"unpruned": self.teacher, "width pruned": self.pruned("width"), "depth pruned": self.pruned("depth")}
        rows = measure(models, prompts, s.table1_new_tokens, seed=s.seed, batch=32, progress=self.progress)
        data = {"prompts": len(prompts), "prefix_tokens": s.table1_prefix_tokens, "new_tokens": s.table1_new_tokens,
                "rows": rows}
        write_json(folder / "table1.json", data)
        crep = {(r["model"], r["decoding"]): r["crep"] for r in rows}
        summary = "CREP % greedy / top-p: " + ", ".join(
            f"{m} {crep[(m, 'greedy')]:.0f} / {crep[(m, 'top-p 0.9')]:.0f}" for m in models)
        return data, summary

    # 4. pairs --------------------------------------------------------------------------------
    def _run_pairs(self, folder: Path):
        from ..micro import corpus_documents
        from ..mining import MiningConfig, run_mining

        s = self.s
        prompts = folder / "prompts.jsonl"
        with open(prompts, "w", encoding="utf-8") as handle:
            for i, doc in enumerate(corpus_documents("valid")[: s.mining_prompts]):
                handle.write(json.dumps({"id": f"wikitext2-valid-{i}", "text": doc}) + "\n")
        extra = {}
        if s.mining_teacher_temperature is not None:
            extra["teacher_temperature"] = s.mining_teacher_temperature
        cfg = MiningConfig(prompts=str(prompts), output=self.pairs_file, student=self.pruned("width"), id_field="id",
                           prefix_tokens=s.mining_prefix_tokens, max_new_tokens=s.mining_new_tokens,
                           temperature=s.mining_temperature, top_p=0.9, seed=s.seed, target_pairs=s.target_pairs,
                           batch_size=32, device=self.device, progress=self.progress, **extra)
        summary = run_mining(cfg)
        if summary.pairs_total == 0:
            raise DemoError(f"pair mining kept no pairs ({summary.prompts_tried} prompts tried, "
                            f"{summary.degenerate} degenerate); see {self.pairs_file}.summary.json")
        data = summary.to_dict() | {"teacher": cfg.teacher_path(), "student": cfg.student,
                                    "settings": {k: getattr(cfg, k) for k in (
                                        "prefix_tokens", "max_new_tokens", "top_p", "temperature", "threshold",
                                        "target_pairs", "positive_attempts", "seed")}
                                    | {"teacher_temperature": getattr(cfg, "teacher_temperature", None)}}
        text = (f"{summary.pairs_total} pairs from {summary.prompts_tried} prompts "
                f"({summary.degenerate_share:.0%} of the student's samples degenerate, "
                f"{summary.pairs_dropped_no_positive + summary.negatives_dropped} dropped)")
        return data, text

    # 5. fine-tuning --------------------------------------------------------------------------
    def _write_sft(self, path: Path) -> int:
        """The SFT data: the training text (WikiText-2 valid slice) in chunks of at most
        ``sft_chunk_tokens`` tokens (axolotl drops rows longer than ``sequence_len``)."""
        from transformers import AutoTokenizer

        from ..micro import corpus_documents

        tokenizer = AutoTokenizer.from_pretrained(self.teacher)
        n = 0
        with open(path, "w", encoding="utf-8") as handle:
            for doc in corpus_documents("valid"):
                ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
                for start in range(0, len(ids), self.s.sft_chunk_tokens):
                    text = tokenizer.decode(ids[start : start + self.s.sft_chunk_tokens]).strip()
                    if text and (self.s.sft_max_rows is None or n < self.s.sft_max_rows):
                        handle.write(json.dumps({"text": text}) + "\n")
                        n += 1
        return n

    def _run_train(self, folder: Path):
        import yaml

        s = self.s
        sft = folder / "sft.jsonl"
        rows = self._write_sft(sft)
        configs = train_configs(s, self.pruned("width"), str(sft), self.pairs_file, folder)
        data: dict[str, Any] = {"sft_rows": rows, "runs": {}}
        pending = []
        for run, cfg in configs.items():
            config = folder / f"{run}.yml"
            header = (f"# axolotl-focus demo: {RUNS[run][1]}\n# generated by axolotl_focus/demo.py; run with: "
                      f"axolotl train {config.name}\n")
            config.write_text(header + yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
            done = read_json(folder / f"{run}.done.json")
            if done and done.get("key") == digest(cfg):
                data["runs"][run] = done
                self.echo(f"    {run}: reused ({len(done['logs'])} steps, final loss {done['final_loss']:.3f})")
            else:
                pending.append((run, cfg, config))
        data["teacher_cache"] = self._build_teacher_cache(folder, configs)
        pending.sort(key=lambda item: item[0] != "dpo")  # the longest run first: no lone run at the end
        jobs = min(self.jobs, len(pending)) or 1
        threads = max(1, self.threads // jobs)

        def train(run: str, cfg: dict, config: Path, slot: int) -> dict:
            shutil.rmtree(cfg["output_dir"], ignore_errors=True)
            t0 = time.perf_counter()
            logs = axolotl_train(config, folder / f"{run}.log", cfg["max_steps"], f"    axolotl train {run}",
                                 threads, self.progress, position=slot, device=self.device)
            if not logs:
                raise DemoError(f"axolotl train {config}: no training steps were logged; see {folder / (run + '.log')}")
            if s.train_lora_r:
                merge_lora(cfg["base_model"], cfg["output_dir"], self.trained(run))
            tail = logs[-max(1, len(logs) // 10):]
            record = {"key": digest(cfg), "config": str(config), "output_dir": cfg["output_dir"], "logs": logs,
                      "final_loss": sum(r["loss"] for r in tail) / len(tail),
                      "elapsed_s": round(time.perf_counter() - t0, 1), "concurrent_runs": jobs}
            write_json(folder / f"{run}.done.json", record)
            return record

        for run, record in run_concurrently(pending, train, jobs, dataset_key=lambda item: digest(
                [item[1]["datasets"], item[1].get("rl")])):
            data["runs"][run] = record
            self.echo(f"    {run} ({len(data['runs'])}/{len(configs)}): {len(record['logs'])} steps in "
                      f"{fmt_time(record['elapsed_s'])}, final loss {record['final_loss']:.3f}")
        data["runs"] = {run: data["runs"][run] for run in configs}
        timing = [r["elapsed_s"] for r in data["runs"].values()]
        summary = (f"{len(configs)} runs ({', '.join(configs)}), {s.train_steps} steps each (DPO {s.dpo_steps}), "
                   f"{sum(timing):.0f} s in axolotl subprocesses, {jobs} at a time")
        return data, summary

    def _build_teacher_cache(self, folder: Path, configs: dict[str, dict]) -> dict | None:
        """Build (or reuse) the one teacher cache that the ``*-cached`` runs read, with the real
        command in a subprocess: ``axolotl-focus teacher-cache <run>.yml`` tokenizes the run's data
        through axolotl exactly as ``axolotl train`` will (and prepares it for the runs). Resumable:
        an interrupted build keeps its finished shards."""
        from ..teacher_cache import folder_size, read_meta

        users = [run for run, cfg in configs.items() if cfg.get("focus_teacher_cache")]
        if not users:
            return None
        path, record_file = cache_dir(self.s, folder), folder / "teacher_cache.done.json"
        meta, record = read_meta(path), read_json(record_file)
        if meta is not None and meta.complete and record and record.get("path") == str(path):
            self.echo(f"    teacher cache: reused ({record['positions']:,} positions, k {record['k']})")
            return record
        log = folder / "teacher_cache.log"
        self.echo(f"    teacher cache (k {self.s.cache_k}, for {', '.join(users)}) -> {path.name}; log {log.name}")
        t0 = time.perf_counter()
        run_logged([sys.executable, "-m", "axolotl_focus.cli", "teacher-cache", str(folder / f"{users[0]}.yml"),
                    "--output", str(path), "--k", str(self.s.cache_k), "--threads", str(self.threads),
                    "--device", self.device, "--no-progress"], log, axolotl_env(self.threads, self.device), folder)
        meta = read_meta(path)
        if meta is None or not meta.complete:
            raise DemoError(f"teacher-cache finished but {path} is not a complete cache; log: {log}")
        record = {"path": str(path), "k": meta.k, "temperature": meta.temperature, "sequences": meta.sequences,
                  "positions": meta.positions, "size_bytes": folder_size(path), "runs": users,
                  "elapsed_s": round(time.perf_counter() - t0, 1), "threads": self.threads}
        write_json(record_file, record)
        self.echo(f"    teacher cache: {meta.sequences:,} sequences, {meta.positions:,} positions, "
                  f"{record['size_bytes'] / 2**20:.1f} MiB in {fmt_time(record['elapsed_s'])}")
        return record

    # 6. evaluation ---------------------------------------------------------------------------
    def eval_models(self) -> dict[str, str]:
        models = {"teacher (unpruned)": self.teacher, "width pruned": self.pruned("width"),
                  "depth pruned": self.pruned("depth")}
        for run in self.s.runs:
            models[RUNS[run][0]] = self.trained(run)
        return models

    def eval_config(self, folder: Path):
        from ..evaluate import EvalConfig

        s = self.s
        return EvalConfig(
            output_dir=str(folder), tasks=("open_ended",), metrics=("ppl", "repetition", "mauve"),
            documents="embedded", ppl_data="embedded",  # offline whatever HF_HUB_OFFLINE says
            decodings=("top_p", "greedy"), seeds=tuple(s.seed + k for k in s.eval_seeds), batch_size=32,
            num_documents=s.eval_documents,
            data_seed=s.seed, prefix_tokens=s.eval_prefix_tokens, max_new_tokens=s.eval_new_tokens,
            ppl_window=256, ppl_stride=128, ppl_max_tokens=s.ppl_max_tokens, mauve_featurizer=self.teacher,
            mauve_seeds=tuple(s.mauve_seeds), mauve_max_text_length=256, device=self.device, progress=self.progress,
        )

    def low_eval_config(self, folder: Path):
        """Top-p 0.9 at ``eval_low_temperature`` (repetition and MAUVE only), or None."""
        from dataclasses import replace

        t = self.s.eval_low_temperature
        if not t:
            return None
        return replace(self.eval_config(folder), output_dir=str(folder / f"temperature{t:g}"),
                       metrics=("repetition", "mauve"), decodings=("top_p",), temperature=t, plots=False,
                       seeds=tuple(self.s.seed + k for k in self.s.eval_low_seeds))

    def _run_eval(self, folder: Path):
        from ..evaluate import evaluate_models
        from ..table1 import measure

        s = self.s
        results = evaluate_models(self.eval_models(), self.eval_config(folder))
        low = self.low_eval_config(folder)
        low_results = evaluate_models(self.eval_models(), low) if low else []
        # Table 1's condition in the paper: the pruned model after fine-tuning (here: the CE run)
        extra = []
        if "ce" in s.runs and s.table1_prompts:
            extra = measure({"width pruned + CE fine-tuning": self.run_dir("ce")}, self._table1_prompts(),
                            s.table1_new_tokens, seed=s.seed, batch=32, progress=self.progress)
        write_json(folder / "table1_finetuned.json", {"rows": extra})
        methods = [RUNS[r][0] for r in s.runs]
        parts = []
        for label, res in (("T=1", results), (f"T={s.eval_low_temperature:g}", low_results)):
            if res:
                flat = {r["model"]: flat_metrics(r, decoding_key(res)) for r in res}
                parts.append(f"top-p {label} CREP % " + ", ".join(
                    f"{m} {flat[m].get('crep', float('nan')):.1f}" for m in methods if m in flat))
        unavailable = sorted({k for r in results + low_results for k in r.get("unavailable", {})})
        summary = f"{len(results)} models, {results[0]['open_ended']['prompts']} documents; " + "; ".join(parts)
        summary = summary.replace("top-p T=1", f"top-p T=1 (seeds {list(s.eval_seeds)})").replace(
            f"top-p T={s.eval_low_temperature:g}",
            f"top-p T={s.eval_low_temperature:g} (seeds {list(s.eval_low_seeds)})")
        if unavailable:
            summary += f"; unavailable: {', '.join(unavailable)}"
        return {"models": self.eval_models(), "unavailable": unavailable}, summary

    # report ----------------------------------------------------------------------------------
    def write_report(self, total_s: float | None = None) -> Path:
        path = self.out / REPORT
        files.write_text(path, render_report(self, total_s))
        return path


def _num_layers(path: str | os.PathLike) -> int:
    return int(json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"])


def merge_lora(base: str, adapter: str, out: str) -> str:
    """Merge the LoRA adapter that ``axolotl train`` saved in ``adapter`` into the weights of
    ``base`` and save a full checkpoint in ``out`` (pruned checkpoints keep their per-layer shapes;
    tied embeddings stay tied: LoRA does not touch lm_head here)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..pruning import save_pruned

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    save_pruned(model, tokenizer, out)
    return out


def _param_count(path: str | os.PathLike) -> int:
    from safetensors import safe_open

    total = 0
    with safe_open(str(Path(path) / "model.safetensors"), framework="pt") as handle:
        for name in handle.keys():
            total += math.prod(handle.get_slice(name).get_shape())
    return total
