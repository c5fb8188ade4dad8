"""Similarity of the generations to the references: MAUVE (open-ended) and BERTScore (instructions).

* MAUVE (``mauve-text``): features = the final-layer hidden state of the last token (MAUVE's own
  featurization) from a local or cached HF model (``mauve_featurizer``, default gpt2-large),
  texts truncated to ``mauve_max_text_length`` featurizer tokens; p = reference continuations,
  q = generations; ``compute_mauve(p_features=, q_features=, seed=s)`` averaged over
  ``mauve_seeds``, then over generation seeds.
* BERTScore F1 (``bert-score``; default roberta-large, layer 17), rescaled with bert-score's
  baseline when ``bertscore_rescale`` and a baseline exists for the model (results say which).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..files import digest
from .config import EvalConfig, MetricUnavailable, require


class Featurizer:
    """MAUVE features: final-layer hidden state of each text's last token (as ``mauve-text``)."""

    def __init__(self, name: str, device, max_len: int, batch_size: int = 8):
        from transformers import AutoModel, AutoTokenizer  # heavy: only once the featurizer is used

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name)
            self.model = AutoModel.from_pretrained(name).to(device).eval()
        except (OSError, ValueError) as err:
            raise MetricUnavailable(
                f"MAUVE: featurizer model {name!r} cannot be loaded ({type(err).__name__}); pass "
                "--mauve-featurizer PATH (a local gpt2-large checkout, or any local HF model) or run online"
            ) from None
        self.name, self.max_len, self.batch_size = name, max_len, batch_size
        self._cache: dict[str, Any] = {}

    def __call__(self, texts: list[str]):
        key = digest(texts)
        if key in self._cache:
            return self._cache[key]
        fallback = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        enc = [self.tokenizer(t, add_special_tokens=True, truncation=True, max_length=self.max_len)["input_ids"]
               or [fallback] for t in texts]
        order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
        feats = [None] * len(enc)
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            for b in range(0, len(order), self.batch_size):
                idx = order[b : b + self.batch_size]
                width = max(len(enc[i]) for i in idx)
                x = torch.tensor([enc[i] + [0] * (width - len(enc[i])) for i in idx], device=device)
                mask = torch.tensor([[1] * len(enc[i]) + [0] * (width - len(enc[i])) for i in idx], device=device)
                hidden = self.model(input_ids=x, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
                for row, i in enumerate(idx):
                    feats[i] = hidden[row, len(enc[i]) - 1].float().cpu()
        out = torch.stack(feats).numpy()
        self._cache[key] = out
        return out


def mauve_score(p_texts: list[str], q_texts: list[str], featurizer: Callable[[list[str]], Any],
                seeds: Sequence[int] = (1, 2, 3, 4, 5), scaling_factor: float = 5.0) -> dict:
    """MAUVE(p = references, q = generations) per seed of ``compute_mauve``, and their mean."""
    mauve = require("mauve", "mauve-text", "MAUVE")
    p, q = featurizer(p_texts), featurizer(q_texts)
    values = [float(mauve.compute_mauve(p_features=p, q_features=q, seed=s, mauve_scaling_factor=scaling_factor,
                                        verbose=False).mauve) for s in seeds]
    return {"mauve": sum(values) / len(values), "mauve_values": values}


class BertScorer:
    def __init__(self, cfg: EvalConfig, device):
        bert_score = require("bert_score", "bert-score", "BERTScore")
        from bert_score.utils import model2layers  # optional (the eval extra), checked just above

        name = cfg.bertscore_model
        layer = cfg.bertscore_layer or model2layers.get(name) or model2layers.get(os.path.basename(name.rstrip("/")))
        if layer is None:
            raise MetricUnavailable(f"BERTScore: no default layer for {name!r}; pass --bertscore-layer N")
        baseline = cfg.bertscore_baseline
        if cfg.bertscore_rescale and baseline is None:
            shipped = (Path(bert_score.__file__).parent / "rescale_baseline" / "en"
                       / f"{os.path.basename(name.rstrip('/'))}.tsv")
            baseline = str(shipped) if shipped.is_file() else None
        self.rescaled = bool(cfg.bertscore_rescale and baseline)
        try:
            self.scorer = bert_score.BERTScorer(model_type=name, num_layers=layer, lang="en" if self.rescaled else None,
                                                rescale_with_baseline=self.rescaled, baseline_path=baseline,
                                                device=str(device), batch_size=cfg.batch_size)
        except (OSError, ValueError) as err:
            raise MetricUnavailable(
                f"BERTScore: model {name!r} cannot be loaded ({type(err).__name__}); pass --bertscore-model PATH "
                "(a local roberta-large checkout) and --bertscore-layer, or run online") from None
        tok, limit = self.scorer._tokenizer, getattr(self.scorer._model.config, "max_position_embeddings", 512)
        tok.model_max_length = min(tok.model_max_length, limit - 2 if limit > 512 else limit)
        self.info = {"bertscore_model": name, "bertscore_layer": layer, "bertscore_rescaled": self.rescaled,
                     "bertscore_baseline": baseline}

    def __call__(self, cands: list[str], refs: list[str]) -> float:
        """Mean F1. An empty candidate scores bert-score's own convention for it (raw F1 = 0,
        then rescaled): computed here because bert-score's empty-text path is broken under
        transformers 5 (``build_inputs_with_special_tokens`` is gone)."""
        keep = [i for i, c in enumerate(cands) if c.strip()]
        f1 = [0.0] * len(cands)
        if self.rescaled:
            base = float(self.scorer.baseline_vals[2])
            f1 = [(0.0 - base) / (1.0 - base)] * len(cands)
        if keep:
            _, _, got = self.scorer.score([cands[i] for i in keep], [refs[i] for i in keep])
            for i, v in zip(keep, got.tolist()):
                f1[i] = v
        return sum(f1) / len(f1)


def bertscore_f1(cands: list[str], refs: list[str], cfg: EvalConfig | None = None, device="cpu") -> dict:
    """Mean BERTScore F1 of ``cands`` against ``refs`` (model/layer/rescaling from ``cfg``)."""
    scorer = BertScorer(cfg or EvalConfig(), device)
    return {"bertscore": scorer(cands, refs), **scorer.info}
