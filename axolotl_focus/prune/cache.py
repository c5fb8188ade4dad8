"""The axolotl-time pruning preprocessor: `focus_prune:` in an axolotl config, cached by (source, settings).

`axolotl train cfg.yml` with a `focus_prune:` block prunes `base_model` once, in the plugin's
`register` hook (before axolotl validates the config or loads anything), stores the checkpoint
under a key of (source model, its fingerprint, pruning settings, calibration) and rewrites
`base_model` to it; the teacher defaults to the unpruned source. The next run with the same
settings and an unchanged source reuses the cache. In a multi-process launch only rank 0 prunes;
the other ranks wait for the finished checkpoint, which appears atomically (written to a
temporary folder, then renamed).

Source fingerprint (:func:`axolotl_focus.fingerprints.source_fingerprint`, part of the cache
key; loads no weights): overwriting the source (retrained weights of the same shapes included)
changes the key, so the next run prunes again into a new folder. Offline, a hub id without a local
cache has no revision, and a warning says staleness cannot be checked.
The fingerprint is stored as `source_fingerprint` in pruning_report.json. A cache hit whose stored
fingerprint differs from the current one (a digest collision, a folder copied by hand) is not
reused and not overwritten: a warning names the changed files and the source is pruned into the
sibling folder `<cache folder>-<fingerprint digest>`. Entries cached before the fingerprint was
part of the key (no `source_fingerprint`) are simply misses: they stay on disk, unused; delete
them by hand.

`plan_prune(source, spec)` is the dry run of `axolotl-focus validate`: it reads only config.json
(a local folder, the hub cache, or a download of that one file when online), validates the
settings against it, checks the calibration source and reports the cache folder, whether it is
cached, and the closed-form parameter counts; it loads no weights and writes nothing.

Also here: `run_prune` (load, prune, write a checkpoint atomically), `prune` (width or depth, per
the settings), and the `register`-hook helpers `apply_to_config` and
`disable_attention_lora_kernels`. The settings are `settings.PruneSettings`; the calibration
texts come from `calibration.load_calibration_texts`.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from .. import fingerprints
from ..files import exclusive_lock
from ..locations import cached_hub_file, hub_offline
from ..options import resolve_device
from . import checkpoint
from .calibration import calibration_source, load_calibration_texts
from .depth import prune_depth
from .report import report_dict
from .settings import PruneSettings
from .shapes import count_params, plan_width
from .width import prune_width

LOG = logging.getLogger(__name__)

REPORT_FILE = "pruning_report.json"


def default_cache_dir() -> Path:
    return Path(os.environ.get("AXOLOTL_FOCUS_CACHE", Path.home() / ".cache" / "axolotl_focus")) / "pruned"


def source_fingerprint(source: str) -> dict:
    """:func:`axolotl_focus.fingerprints.source_fingerprint` of the pruning source, with a warning when
    it is a hub id whose revision cannot be known (offline, not in the local hub cache)."""
    fingerprint = fingerprints.source_fingerprint(source)
    if "hub" in fingerprint and fingerprint["revision"] is None:
        LOG.warning("focus_prune: %s is not in the local hub cache and the hub cannot be reached: a cached "
                    "pruned checkpoint of it cannot be checked for staleness", source)
    return fingerprint


def _changed(old: dict, new: dict) -> list[str]:
    """What differs between two fingerprints: file names, or the hub revision."""
    if not old:
        return ["no fingerprint stored"]
    if "hub" in old or "hub" in new:
        return [f"revision {old.get('revision')} -> {new.get('revision')}"]
    names = ["config.json"] if old.get("config") != new.get("config") else []
    for key in ("tokenizer", "weights"):
        a, b = old.get(key) or {}, new.get(key) or {}
        names += sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
    return names


def cache_path(source: str, spec: PruneSettings, fingerprint: dict | None = None) -> Path:
    """Where the checkpoint for (source, its fingerprint, settings, calibration) lives; the
    fingerprint is computed when not given."""
    source_id = os.path.abspath(source) if os.path.isdir(source) else source
    exclude = {"cache_dir", "wait_timeout", "device"}
    if spec.calibration_config is None:
        exclude.add("calibration_config")
    fingerprint = source_fingerprint(source) if fingerprint is None else fingerprint
    key = json.dumps({"source": source_id, "fingerprint": fingerprint, **spec.model_dump(exclude=exclude)},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    name = Path(source_id.rstrip("/")).name or "model"
    tag = f"r{spec.ratio}" if spec.method == "width" else f"b{spec.num_blocks or spec.block_fraction}"
    root = Path(spec.cache_dir) if spec.cache_dir else default_cache_dir()
    return root / f"{name}-{spec.method}-{tag}-{digest}"


def _resolve(source: str, spec: PruneSettings, fingerprint: dict) -> Path:
    """The cache folder to use: cache_path, unless it holds a checkpoint of another version of the
    source (stored fingerprint differs), then its sibling `<folder>-<fingerprint digest>`."""
    path = cache_path(source, spec, fingerprint)
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:8]
    alt = path.with_name(f"{path.name}-{digest}")
    for candidate in (path, alt):
        report = candidate / REPORT_FILE
        if not report.is_file():
            return candidate
        stored = json.loads(report.read_text(encoding="utf-8")).get("source_fingerprint") or {}
        if stored == fingerprint:
            return candidate
        LOG.warning("focus_prune: %s was pruned from another version of %s (changed: %s); not reusing it",
                    candidate, source, ", ".join(_changed(stored, fingerprint)))
    raise ValueError(f"focus_prune: {path} and {alt} hold checkpoints of other versions of {source}; remove them")


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def prune(model, tokenizer, texts, settings: PruneSettings, **kwargs):
    """`width.prune_width` or `depth.prune_depth`, per `settings.method`; returns the PruneReport."""
    method = prune_width if settings.method == "width" else prune_depth
    return method(model, tokenizer, texts, settings, **kwargs)


def run_prune(source: str, spec: PruneSettings, output: str | os.PathLike, fingerprint: dict | None = None) -> dict:
    """Load `source`, prune it per `spec`, and write the checkpoint to `output` atomically.

    The settings are validated against the model's config before any weights are loaded.
    Returns the report (also written as `pruning_report.json` inside the checkpoint), with the
    source's fingerprint (computed before loading, when not given) as `source_fingerprint`. The
    output's lock (:func:`axolotl_focus.files.exclusive_lock`) is held throughout.
    """
    with exclusive_lock(output):  # one writer per checkpoint folder: a second is refused naming the first's PID
        return _run_prune(source, spec, output, fingerprint)


def _run_prune(source: str, spec: PruneSettings, output: str | os.PathLike, fingerprint: dict | None) -> dict:
    import torch  # heavy: torch and transformers only once a model is pruned
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if Path(output).exists():  # checked again before the rename
        raise FileExistsError(f"focus_prune: output {output} exists already; refusing to overwrite it")
    device = resolve_device(spec.device, "focus_prune.device")
    spec.validate(AutoConfig.from_pretrained(source))
    fingerprint = source_fingerprint(source) if fingerprint is None else fingerprint
    texts, calibration = load_calibration_texts(spec)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, spec.dtype)).to(device)
    report = prune(model, tokenizer, texts, spec, source_model=source, calibration_name=calibration)  # logs the summary
    output = Path(output)
    if output.exists():
        raise FileExistsError(f"focus_prune: output {output} exists already; refusing to overwrite it")
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        checkpoint.save_pruned(report.model.to("cpu"), tokenizer, tmp)
        data = {**report_dict(report), "source_fingerprint": fingerprint}
        with open(tmp / REPORT_FILE, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, default=str)
        output.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, output)
    except Exception as exc:
        if isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError":  # a full disk, no permission
            raise OSError(f"focus_prune: writing the pruned checkpoint {output} failed ({exc}); nothing was kept "
                          "(free some disk space, or choose another output)") from exc
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return data


def ensure_pruned(source: str, spec: PruneSettings, fingerprint: dict | None = None) -> Path:
    """The cached pruned checkpoint of this version of `source`, pruning it first if needed (rank 0
    only); `fingerprint`: the source's, when the caller computed it already (`plan_prune`'s)."""
    fingerprint = source_fingerprint(source) if fingerprint is None else fingerprint
    path = _resolve(source, spec, fingerprint)
    if (path / REPORT_FILE).is_file():
        LOG.info("focus_prune: reusing cached pruned checkpoint %s", path)
        return path
    if _is_rank_zero():
        LOG.info("focus_prune: pruning %s -> %s", source, path)
        run_prune(source, spec, path, fingerprint=fingerprint)
        return path
    deadline = time.monotonic() + spec.wait_timeout
    while not (path / REPORT_FILE).is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"focus_prune: rank 0 did not finish {path} within {spec.wait_timeout} s")
        time.sleep(5)
    return path


def plan_prune(source: str, spec: PruneSettings) -> dict:
    """The dry run of pruning `source` per `spec`: loads no weights, writes nothing (offline, a hub
    id not in the local hub cache is not checked: `config` None and a `note`). Raises ValueError
    (prefixed `focus_prune`) for settings the model's config rejects and a local calibration file that
    is missing or unreadable (it is read: not UTF-8, a bad JSON line).
    Returns {source, method, config (the config.json read, or None), fingerprint, cache_path (the
    folder ensure_pruned would use), cached, calibration, params_before, params_after, reduction,
    note} plus {ratio, width_notes} for width or {num_blocks} for depth pruning."""
    from transformers import AutoConfig  # heavy: only a plan reads a model config

    def checked(call, *args):
        try:
            return call(*args)
        except ValueError as exc:
            message = str(exc)
            raise ValueError(message if message.startswith("focus_prune") else f"focus_prune: {message}") from exc

    note = None
    if os.path.isdir(source):
        config_file = os.path.join(source, "config.json")
        if not os.path.isfile(config_file):
            raise ValueError(f"focus_prune: base_model {source} has no config.json")
    elif source.startswith(("/", "./", "../", "~")):
        raise ValueError(f"focus_prune: base_model {source} is not a folder")
    elif (config_file := cached_hub_file(source)) is None and not hub_offline():
        from huggingface_hub import hf_hub_download  # heavy, and only online for a hub id

        try:
            config_file = hf_hub_download(source, "config.json")
        except Exception as exc:  # noqa: BLE001 - not found, gated, no network
            raise ValueError(f"focus_prune: base_model {source}: cannot read its config.json ({exc})") from exc
    elif config_file is None:
        note = f"{source} is not in the local hub cache and the hub is offline: its config was not checked"
    model_config = checked(AutoConfig.from_pretrained, config_file) if config_file else None
    checked(spec.validate, model_config)
    kind, path = calibration_source(spec)
    if kind == "file":
        load_calibration_texts(spec)  # a local file is read now, as pruning would read it
    calibration = {"embedded": "embedded WikiText-2 valid slice", "file": str(path)}.get(kind) or (
        f"hub dataset {spec.calibration} [{spec.calibration_split}] field {spec.calibration_field} (not read)")
    fingerprint = source_fingerprint(source)
    target = _resolve(source, spec, fingerprint)
    plan = {"source": source, "method": spec.method, "config": config_file, "fingerprint": fingerprint,
            "cache_path": str(target), "cached": (target / REPORT_FILE).is_file(), "calibration": calibration,
            "params_before": None, "params_after": None, "reduction": None, "note": note}
    if spec.method == "width":
        width = plan_width(model_config, spec) if model_config is not None else None
        plan.update(ratio=width and width.ratio, width_notes=width and width.notes)
        if width:
            plan.update(params_before=width.params_before, params_after=width.params_after)
    else:
        layers = model_config and model_config.num_hidden_layers
        plan["num_blocks"] = layers and spec.blocks_to_remove(layers)
        if model_config is not None:
            shorter = copy.deepcopy(model_config)
            shorter.num_hidden_layers = layers - plan["num_blocks"]
            plan.update(params_before=count_params(model_config), params_after=count_params(shorter))
    if plan["params_before"]:
        plan["reduction"] = 1 - plan["params_after"] / plan["params_before"]
    return plan


_ATTENTION_LORA_KERNELS = ("lora_qkv_kernel", "lora_o_kernel")


def disable_attention_lora_kernels(cfg: dict) -> None:
    """axolotl's fused LoRA attention kernels assume one attention shape for every layer (and import
    ``transformers.models.<model_type>``, which the earlier ``pruned_llama`` format is not); axolotl
    auto-enables them for LoRA. Turn them off for width-pruned checkpoints (``layer_shapes``; the
    MLP and embedding kernels keep working) and refuse an explicit ``true``, before axolotl's
    validation runs."""
    if cfg.get("adapter") not in ("lora", "qlora"):
        return
    config_file = os.path.join(str(cfg.get("base_model") or ""), "config.json")
    if not os.path.isfile(config_file):
        return
    with open(config_file, encoding="utf-8") as handle:
        config = json.load(handle)
    if config.get("model_type") != "pruned_llama" and config.get("layer_shapes") is None:  # not width-pruned
        return
    for key in _ATTENTION_LORA_KERNELS:
        if cfg.get(key):
            raise ValueError(f"{key}: true is not supported for width-pruned checkpoints (layer_shapes), whose "
                             "layers have their own attention shapes; remove the key or set it to false")
        if cfg.get(key) is None:
            cfg[key] = False
    LOG.info("width-pruned student: axolotl's LoRA attention kernels (lora_qkv_kernel, lora_o_kernel) disabled")


def apply_to_config(cfg: dict, spec: PruneSettings | None = None) -> None:
    """`register` hook: prune (or reuse the cache), point the config at it; `spec`: the `focus_prune`
    block as the check before training validated it (validated here when not given)."""
    block = cfg.get("focus_prune")
    if not block or cfg.get("focus_pruned_from"):  # absent, or already applied
        return
    spec = PruneSettings.model_validate(block) if spec is None else spec
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
