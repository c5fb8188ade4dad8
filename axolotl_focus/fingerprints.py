"""What identifies one version of a model without loading its weights (seconds even for a 16 GB
checkpoint). The pruning cache keys its checkpoints by the source's fingerprint and the teacher
cache records its teacher's, so both notice a model that changed under the same name.

:func:`source_fingerprint`: for a local folder the sha256 of config.json and of the tokenizer
files, and for every top-level weight file (*.safetensors, *.bin, *.pt, *.pth) its size, the
sha256 of its safetensors JSON header and a sha256 of 65 evenly spaced 64 KiB blocks (the first at
offset 0, the last ending at the end of the file; files up to 65 blocks are hashed whole).
Overwriting the source (retrained weights of the same shapes included) changes the fingerprint; a
change confined to the bytes between the sampled blocks goes unseen. For a hub id the fingerprint
is the commit sha: ``HfApi().model_info`` when online (what ``from_pretrained`` would download),
else the local hub cache's ``refs/main``; offline without a cache it is ``{"hub": id, "revision":
None}`` (staleness cannot be checked: the caller says so).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from .locations import cached_hub_file, hub_offline

__all__ = ["WEIGHT_SUFFIXES", "source_fingerprint"]

LOG = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt")
_BLOCK, _BLOCKS = 1 << 16, 64  # weight files are sampled in _BLOCKS + 1 blocks of _BLOCK bytes


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _weight_fingerprint(path: Path) -> dict:
    """Size, sha256 of the safetensors header (None for other formats) and of sampled blocks."""
    size, header, sample = path.stat().st_size, None, hashlib.sha256()
    with open(path, "rb") as handle:
        if path.suffix == ".safetensors" and size >= 8:
            length = int.from_bytes(handle.read(8), "little")
            if 0 < length <= min(size - 8, 1 << 28):
                header = hashlib.sha256(handle.read(length)).hexdigest()
        if size <= _BLOCK * (_BLOCKS + 1):
            handle.seek(0)
            sample.update(handle.read())
        else:
            for i in range(_BLOCKS + 1):
                handle.seek(i * (size - _BLOCK) // _BLOCKS)
                sample.update(handle.read(_BLOCK))
    return {"size": size, "header": header, "sample": sample.hexdigest()}


def source_fingerprint(source: str) -> dict:
    """What identifies this version of ``source`` (see the module docstring):
    {"config", "tokenizer": {name: sha256}, "weights": {name: {"size", "header", "sample"}}} for a
    local folder, {"hub": id, "revision": commit sha or None} for a hub id."""
    if os.path.isdir(source):
        folder = Path(source)
        config = folder / "config.json"
        return {
            "config": _sha256(config) if config.is_file() else None,
            "tokenizer": {n: _sha256(folder / n) for n in _TOKENIZER_FILES if (folder / n).is_file()},
            "weights": {p.name: _weight_fingerprint(p) for p in sorted(folder.iterdir())
                        if p.suffix in WEIGHT_SUFFIXES and p.is_file()},
        }
    revision = None
    if not hub_offline():
        try:
            from huggingface_hub import HfApi  # heavy, and asked only for a hub id while online

            revision = HfApi().model_info(source).sha
        except Exception as exc:  # noqa: BLE001 - no network, private, ...: fall back to the cache
            LOG.debug("model_info(%s) failed: %s", source, exc)
    if revision is None and (cached := cached_hub_file(source)):
        revision = Path(cached).parent.name  # .../snapshots/<commit sha>/config.json
    return {"hub": source, "revision": revision}
