"""The pruning preprocessor: `focus_prune:` in an axolotl config, cached by (source, settings).

`axolotl train cfg.yml` with a `focus_prune:` block prunes `base_model` once, in the plugin's
`register` hook (before axolotl validates the config or loads anything), stores the checkpoint
under a key of (source model, pruning settings, calibration) and rewrites `base_model` to it; the
teacher defaults to the unpruned source. The next run with the same settings reuses the cache.
In a multi-process launch only rank 0 prunes; the other ranks wait for the finished checkpoint,
which appears atomically (written to a temporary folder, then renamed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from .config import FocusPruneArgs

LOG = logging.getLogger(__name__)

REPORT_FILE = "pruning_report.json"
_PRUNE_KEYS = tuple(
    k for k in FocusPruneArgs.model_fields if k not in ("calibration", "calibration_split", "calibration_field",
                                                        "calibration_config", "cache_dir", "dtype", "device",
                                                        "wait_timeout")
)
# hub calibration datasets are streamed: seeded shuffle in a buffer of this many rows, then rows are
# read until enough texts are long enough for the windows (at most _STREAM_MAX_ROWS)
_STREAM_BUFFER = 10_000
_STREAM_MAX_ROWS = 100_000


def default_cache_dir() -> Path:
    return Path(os.environ.get("AXOLOTL_FOCUS_CACHE", Path.home() / ".cache" / "axolotl_focus")) / "pruned"


def load_calibration_texts(spec: FocusPruneArgs) -> tuple[list[str], str]:
    """Calibration texts and a description: the embedded WikiText-2 slice by default, a local
    .txt (one paragraph per line) / .jsonl file, or a hub dataset (`datasets.load_dataset` with
    `calibration_config`, streamed: a seeded shuffle buffer, then non-empty texts are read until
    `calib_samples` of them have at least `calib_seq_len` words, so at least as many tokens)."""
    from .micro import corpus_documents

    source = spec.calibration
    if not source:
        return corpus_documents("valid"), "embedded WikiText-2 valid slice (CC BY-SA 3.0)"
    path = Path(source)
    if path.suffix == ".jsonl" and path.is_file():
        texts = []
        with open(path, encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    texts.append(json.loads(line)[spec.calibration_field])
                except (json.JSONDecodeError, KeyError) as exc:
                    raise ValueError(
                        f"focus_prune.calibration: {path}:{lineno}: expected a JSON object with a "
                        f"{spec.calibration_field!r} field ({exc})"
                    ) from exc
        return texts, f"{path} (field {spec.calibration_field})"
    if path.is_file():
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        return [line for line in lines if line], str(path)
    if path.suffix in (".txt", ".jsonl", ".json") or source.startswith(("/", "./", "../")):
        raise ValueError(f"focus_prune.calibration: file {source} does not exist")
    import datasets  # a hub dataset id

    name = f"{source} ({spec.calibration_config})" if spec.calibration_config else source
    data = datasets.load_dataset(source, spec.calibration_config, split=spec.calibration_split, streaming=True)
    data = data.shuffle(seed=spec.seed, buffer_size=_STREAM_BUFFER).take(_STREAM_MAX_ROWS)
    texts, long_enough = [], 0
    for row in data:
        if spec.calibration_field not in row:
            raise ValueError(f"focus_prune.calibration_field: {name} [{spec.calibration_split}] has no "
                             f"{spec.calibration_field!r} column (columns: {', '.join(row)})")
        text = row[spec.calibration_field]
        if isinstance(text, str) and text.strip():
            texts.append(text)
            long_enough += len(text.split()) >= spec.calib_seq_len
            if long_enough >= spec.calib_samples:
                break
    if not texts:
        raise ValueError(f"focus_prune.calibration: {name} [{spec.calibration_split}] field "
                         f"{spec.calibration_field!r} holds no text")
    return texts, (f"{name} [{spec.calibration_split}] field {spec.calibration_field}: {len(texts)} texts "
                   f"streamed (shuffle seed {spec.seed}, buffer {_STREAM_BUFFER})")


def prune_config(spec: FocusPruneArgs):
    from .pruning import PruneConfig

    values = {k: getattr(spec, k) for k in _PRUNE_KEYS}
    for key in ("attn_layers", "mlp_layers"):
        if values[key] is not None:
            values[key] = tuple(values[key])
    return PruneConfig(**values)


def cache_path(source: str, spec: FocusPruneArgs) -> Path:
    """Where the checkpoint for (source, settings, calibration) lives."""
    source_id = os.path.abspath(source) if os.path.isdir(source) else source
    exclude = {"cache_dir", "wait_timeout", "device"}
    if spec.calibration_config is None:  # keys of checkpoints cached before the option existed stay valid
        exclude.add("calibration_config")
    key = json.dumps({"source": source_id, **spec.model_dump(exclude=exclude)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    name = Path(source_id.rstrip("/")).name or "model"
    tag = f"r{spec.ratio}" if spec.method == "width" else f"b{spec.num_blocks or spec.block_fraction}"
    root = Path(spec.cache_dir) if spec.cache_dir else default_cache_dir()
    return root / f"{name}-{spec.method}-{tag}-{digest}"


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def run_prune(source: str, spec: FocusPruneArgs, output: str | os.PathLike) -> dict:
    """Load `source`, prune it per `spec`, and write the checkpoint to `output` atomically.

    The settings are validated against the model's config before any weights are loaded.
    Returns the report (also written as `pruning_report.json` inside the checkpoint).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .pruning import prune, report_dict, save_pruned

    if Path(output).exists():  # checked again before the rename
        raise FileExistsError(f"focus_prune: output {output} exists already; refusing to overwrite it")
    cfg = prune_config(spec).validate(AutoConfig.from_pretrained(source))
    texts, calibration = load_calibration_texts(spec)
    device = spec.device if spec.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, spec.dtype)).to(device)
    report = prune(model, tokenizer, texts, cfg, source_model=source, calibration_name=calibration)  # logs the summary
    output = Path(output)
    if output.exists():
        raise FileExistsError(f"focus_prune: output {output} exists already; refusing to overwrite it")
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_pruned(report.model.to("cpu"), tokenizer, tmp)
        data = report_dict(report)
        with open(tmp / REPORT_FILE, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, default=str)
        output.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return data


def ensure_pruned(source: str, spec: FocusPruneArgs) -> Path:
    """The cached pruned checkpoint of `source`, pruning it first if needed (rank 0 only)."""
    path = cache_path(source, spec)
    if (path / REPORT_FILE).is_file():
        LOG.info("focus_prune: reusing cached pruned checkpoint %s", path)
        return path
    if _is_rank_zero():
        LOG.info("focus_prune: pruning %s -> %s", source, path)
        run_prune(source, spec, path)
        return path
    deadline = time.monotonic() + spec.wait_timeout
    while not (path / REPORT_FILE).is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"focus_prune: rank 0 did not finish {path} within {spec.wait_timeout} s")
        time.sleep(5)
    return path


_ATTENTION_LORA_KERNELS = ("lora_qkv_kernel", "lora_o_kernel")


def disable_attention_lora_kernels(cfg: dict) -> None:
    """axolotl's fused LoRA attention kernels import ``transformers.models.<model_type>``, which a
    width-pruned ``pruned_llama`` checkpoint is not; it auto-enables them for LoRA. Turn them off
    for such checkpoints (the MLP and embedding kernels keep working) and refuse an explicit
    ``true``, before axolotl's validation runs."""
    if cfg.get("adapter") not in ("lora", "qlora"):
        return
    config_file = os.path.join(str(cfg.get("base_model") or ""), "config.json")
    if not os.path.isfile(config_file):
        return
    with open(config_file, encoding="utf-8") as handle:
        if json.load(handle).get("model_type") != "pruned_llama":
            return
    for key in _ATTENTION_LORA_KERNELS:
        if cfg.get(key):
            raise ValueError(f"{key}: true is not supported for width-pruned (pruned_llama) checkpoints, whose "
                             "layers have their own attention shapes; remove the key or set it to false")
        if cfg.get(key) is None:
            cfg[key] = False
    LOG.info("pruned_llama student: axolotl's LoRA attention kernels (lora_qkv_kernel, lora_o_kernel) disabled")


def apply_to_config(cfg: dict) -> None:
    """`register` hook: validate `focus_prune`, prune (or reuse the cache), point the config at it."""
    block = cfg.get("focus_prune")
    if not block or cfg.get("focus_pruned_from"):  # absent, or already applied
        return
    spec = FocusPruneArgs.model_validate(block)
    source = cfg.get("base_model")
    if not source:
        raise ValueError("focus_prune: needs `base_model` (the unpruned model to prune)")
    path = str(ensure_pruned(source, spec))
    cfg["focus_pruned_from"] = source
    if not cfg.get("focus_teacher_model"):
        cfg["focus_teacher_model"] = source
    for key in ("base_model_config", "tokenizer_config"):
        if cfg.get(key) == source:
            cfg[key] = path
    cfg["base_model"] = path
