"""Micro LLaMA models and a tokenizer built offline from the embedded WikiText-2 slice, and the
``axolotl-focus tiny`` command.

Used by the tiny example, the demo and the tests: everything here runs on a laptop CPU in
seconds, with no model hub.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import re
from importlib import resources
from pathlib import Path

from tqdm.auto import tqdm

from .arg_types import positive_int
from .wikitext import clean as clean_text

LOG = logging.getLogger(__name__)

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def corpus_text(split: str = "valid") -> str:
    """The embedded WikiText-2 slice ('valid' or 'test'), CC BY-SA 3.0 (see data/wikitext-2)."""
    return resources.files("axolotl_focus").joinpath(f"data/wikitext-2/{split}.txt").read_text("utf-8")


def corpus_documents(split: str = "valid", min_chars: int = 200, clean: bool = False) -> list[str]:
    """Paragraphs of the slice (headings dropped), whitespace-normalized; with ``clean``, WikiText's
    markup undone and its ``<unk>`` dropped (:func:`axolotl_focus.wikitext.clean`)."""
    docs = []
    for line in corpus_text(split).split("\n"):
        line = line.strip()
        if len(line) >= min_chars and not re.match(r"^=.*=$", line):
            docs.append(clean_text(line) if clean else line)
    return docs


def build_tokenizer(texts: list[str], vocab_size: int = 1024):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts`` (LLaMA-style specials)."""
    # heavy: the corpus readers of this module need neither
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [SPECIAL_TOKENS[k] for k in ("pad_token", "bos_token", "eos_token", "unk_token")]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(SPECIAL_TOKENS["bos_token"])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL_TOKENS['bos_token']} $A", special_tokens=[(SPECIAL_TOKENS["bos_token"], bos_id)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def llama_config(tokenizer, *, hidden: int = 64, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                 intermediate: int = 176, max_positions: int = 512):
    """A LLaMA config of the given (tiny) size; GQA when ``kv_heads < heads``."""
    from transformers import LlamaConfig  # heavy: the corpus readers of this module need none

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def pretrain(model, tokenizer, texts: list[str], *, steps: int = 200, batch: int = 16, seq_len: int = 64,
             lr: float = 3e-3, seed: int = 0, progress: bool = True) -> list[float]:
    """Plain next-token pretraining on random windows of ``texts``; returns the loss curve."""
    import torch  # heavy: the corpus readers of this module need no torch

    ids = torch.tensor(tokenizer("\n".join(texts), add_special_tokens=False)["input_ids"])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="pretraining micro teacher", unit="step", mininterval=2, disable=not progress)
    for _ in bar:
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=gen)
        x = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return losses


def drop_layers(model, keep: list[int]):
    """A copy of ``model`` with only the decoder layers in ``keep`` (re-indexed), as a vanilla config."""
    import torch  # heavy: the corpus readers of this module need no torch

    student = copy.deepcopy(model)
    student.model.layers = torch.nn.ModuleList(student.model.layers[i] for i in keep)
    for new_idx, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = new_idx
    student.config.num_hidden_layers = len(keep)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    return student


def build_micro_teacher(out_dir: str | os.PathLike, *, steps: int = 200, seed: int = 0, vocab_size: int = 1024,
                        progress: bool = True, **size) -> tuple[str, list[float]]:
    """Train and save a micro LLaMA teacher (and its tokenizer) on the embedded corpus.

    ``size`` goes to :func:`llama_config` (default: 4 layers, hidden 64, GQA 4/2 heads).
    Returns the checkpoint path and the pretraining loss curve.
    """
    import torch  # heavy: the corpus readers of this module need no torch
    from transformers import LlamaForCausalLM

    out = Path(out_dir)
    torch.manual_seed(seed)
    docs = corpus_documents("valid")
    tokenizer = build_tokenizer(docs, vocab_size=vocab_size)
    teacher = LlamaForCausalLM(llama_config(tokenizer, **size))
    losses = pretrain(teacher, tokenizer, docs, steps=steps, seed=seed, progress=progress)
    LOG.info("teacher pretraining loss %.3f -> %.3f", losses[0], losses[-1])
    teacher.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out), losses


def build_tiny_pair(out_dir: str | os.PathLike, *, steps: int = 200, seed: int = 0) -> dict:
    """Build the tiny example: tokenizer, a pretrained GQA teacher, a layer-dropped student that
    records the teacher as its source model, and a small JSONL training set. Returns the paths."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: the corpus readers of this module need none

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"teacher": out / "teacher", "student": out / "student", "train": out / "train.jsonl"}
    _, losses = build_micro_teacher(paths["teacher"], steps=steps, seed=seed)
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"])
    tokenizer = AutoTokenizer.from_pretrained(paths["teacher"])
    student = drop_layers(teacher, keep=[0, teacher.config.num_hidden_layers - 1])
    student.config.focus_source_model = str(paths["teacher"].resolve())
    student.save_pretrained(paths["student"])
    tokenizer.save_pretrained(paths["student"])
    with open(paths["train"], "w", encoding="utf-8") as handle:
        for doc in corpus_documents("valid")[:400]:
            handle.write(json.dumps({"text": doc}) + "\n")
    return {k: str(v) for k, v in paths.items()} | {"teacher_loss": losses}


def add_tiny_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``axolotl-focus tiny``."""
    parser.add_argument("--out", default="examples/tiny/build", help="output folder (default: examples/tiny/build)")
    parser.add_argument("--steps", type=positive_int, default=200, help="teacher pretraining steps (default: 200)")


def run_tiny_cli(args: argparse.Namespace) -> int:
    """``axolotl-focus tiny``: build the tiny example, print its paths."""
    paths = build_tiny_pair(args.out, steps=args.steps)
    for key in ("teacher", "student", "train"):
        print(f"{key}: {paths[key]}")
    return 0
