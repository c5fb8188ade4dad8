"""The processes of a run: one, or several sharing out the generation.

Under ``torchrun`` / ``accelerate launch`` with N
processes the batches are shared out (``PartialState().split_between_processes``), each rank
generating on its own device, and gathered back in order on rank 0: batches and seeds depend
only on the prompt order, so the generations equal a one-process run's on the same kind of
device. Rank 0 alone loads data, computes the other metrics and writes every file.
"""

from __future__ import annotations

import datetime
import gc
from typing import Any, Callable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..generation import generate_batch, process_state
from .config import EvalConfig, MetricUnavailable
from .lm_harness import zero_shot

WORKER_TIMEOUT_H = 24  # how long the other ranks may wait for rank 0 (its metrics) between requests


class Ranks:
    """The processes of a run. One process: everything runs in it. Several (``torchrun`` /
    ``accelerate launch``, one per device): rank 0 runs the evaluation (data, metrics, files)
    and the other ranks wait in :meth:`serve` for its requests: generation (a request's batches
    are shared out with ``PartialState().split_between_processes``, every rank generates its
    batches on its own ``PartialState().device`` and rank 0 collects them with ``gather_object``),
    zero-shot (lm-eval's own data parallelism needs every rank), releasing models, stop.
    Requests and results travel over a gloo group whose timeout is :data:`WORKER_TIMEOUT_H`
    hours, so the other ranks can wait while rank 0 computes PPL, MAUVE or BERTScore."""

    def __init__(self):
        self.state = process_state()
        self.size, self.rank = self.state.num_processes, self.state.process_index
        self.group = None
        self._models: dict[str, Any] = {}
        self._tokenizers: dict[str, Any] = {}
        if self.size > 1:
            self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=WORKER_TIMEOUT_H))

    # messages (rank 0 -> all, all -> rank 0)
    def _send(self, kind: str, job: dict | None = None) -> None:
        if self.size > 1:
            dist.broadcast_object_list([(kind, job)], src=0, group=self.group)

    def _receive(self) -> tuple[str, dict | None]:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def _gather(self, obj) -> list | None:
        out = [None] * self.size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    # rank 0's side
    def generate(self, model, tokenizer, job: dict, paths: tuple[str, str] | None, desc: str = "",
                 progress: bool = False) -> list[tuple[list[int], str | None]]:
        """``(tokens, stop reason)`` per prompt of ``job``, in order (on the other ranks: ``[]``)."""
        if self.size > 1 and self.rank == 0:
            if paths is None:
                raise ValueError("several processes: a generation request needs the model and tokenizer paths")
            self._send("generate", job | {"model": paths[0], "tokenizer": paths[1]})
        size, prompts = job["batch_size"], job["prompts"]
        starts = list(range(0, len(prompts), size))
        done: dict[int, list] = {}
        # split_between_processes hands a rank past the end a copy of the last batch: skipped below
        with self.state.split_between_processes(list(range(len(starts)))) as mine:
            for b in tqdm(mine, desc=desc, unit="batch", disable=not (progress and self.rank == 0)):
                if b in done:
                    continue
                batch = prompts[starts[b] : starts[b] + size]
                gen = generate_batch(model, tokenizer, batch, [job["budget"]] * len(batch),
                                     seed=job["seed"] * 100003 + b, do_sample=job["do_sample"], top_p=job["top_p"],
                                     temperature=job["temperature"])
                done[b] = list(zip(gen.tokens, gen.reason))
        if self.size > 1:
            parts = self._gather(done)
            if self.rank != 0:
                return []
            done = {}
            for part in parts:
                for b, rows in part.items():
                    done.setdefault(b, rows)
        return [row for b in range(len(starts)) for row in done[b]]

    def zero_shot(self, **kwargs) -> dict:
        self._send("zero_shot", kwargs)
        return zero_shot(**kwargs)

    def release(self) -> None:
        self._send("release")

    def stop(self) -> None:
        self._send("stop")

    # the other ranks' side
    def serve(self, cfg: EvalConfig, load_model: Callable[[str, EvalConfig], Any]) -> None:
        """Answer rank 0's requests until it sends ``stop``; ``load_model(path, cfg)`` loads a model
        the first time a request names it (:func:`axolotl_focus.evaluate.models.load_model`)."""
        from transformers import AutoTokenizer  # heavy: only the other ranks of a multi-process run serve

        while True:
            kind, job = self._receive()
            if kind == "stop":
                break
            if kind == "generate":
                path = job["model"]
                if path not in self._models:
                    if len(self._models) >= 2:  # rank 0 holds at most a student and the teacher
                        self._models.pop(next(iter(self._models)))
                    self._models[path] = load_model(path, cfg)
                self._models[path] = self._models.pop(path)  # most recently used last
                if job["tokenizer"] not in self._tokenizers:
                    self._tokenizers[job["tokenizer"]] = AutoTokenizer.from_pretrained(
                        job["tokenizer"], trust_remote_code=cfg.trust_remote_code)
                self.generate(self._models[path], self._tokenizers[job["tokenizer"]], job, None)
            elif kind == "zero_shot":
                self._release_models()
                try:
                    zero_shot(**job)
                except MetricUnavailable:
                    pass  # rank 0 reports it
            elif kind == "release":
                self._release_models()
        self._release_models()

    def _release_models(self) -> None:
        if self._models:
            self._models.clear()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


_RANKS: Ranks | None = None


def get_ranks() -> Ranks:
    """This process's :class:`Ranks` (made once: the gloo group must be created by every rank)."""
    global _RANKS
    if _RANKS is None:
        _RANKS = Ranks()
    return _RANKS
