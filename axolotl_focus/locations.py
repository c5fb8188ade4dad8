"""Where a model or dataset name points: a local path or a Hugging Face hub id, and whether it
can be reached without loading anything.

A name *looks local* when it exists, ends in a file suffix (``.jsonl``, ``.json``, ``.txt``,
``.text``), starts with ``/``, ``./``, ``../`` or ``~``, or has more than one ``/`` (a hub id is
``name`` or ``namespace/name``). Everything else is taken as a hub id. ``resolve_model`` says,
for a model, which of these it is and where its ``config.json`` is (the folder, or the local hub
cache), and raises a ``ValueError`` naming the config field when a local model is missing or its
weights are damaged (:func:`check_weight_files`: every ``*.safetensors`` file as long as its header
says, every file of a sharded index present; no weights are read). The hub is offline when
``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` is set to a true value, and also when it cannot be
reached: :func:`hub_offline` then tries one connection to the hub's host (or the HTTPS proxy) once per
process, and an unreachable hub switches the process to offline mode (``HF_HUB_OFFLINE=1`` for every
library: no retries, no half-failed requests) with one warning, so that the verdicts are those of an
offline run.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from dataclasses import dataclass
from urllib.parse import urlparse

LOG = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".jsonl", ".json", ".txt", ".text")


def looks_local(name: str) -> bool:
    """Whether ``name`` names a local file or folder rather than a hub id."""
    return (
        os.path.exists(name)
        or name.endswith(LOCAL_SUFFIXES)
        or name.startswith(("/", "./", "../", "~"))
        or name.count("/") > 1
    )


_UNREACHABLE: list[str] = []  # why the hub could not be reached (the probe runs once per process)


def hub_offline() -> bool:
    """Whether the hub is offline: set so (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``), or
    unreachable (see the module docstring; the probe runs once)."""
    from huggingface_hub import constants  # heavy: the CLI's --help needs no hub client

    if constants.HF_HUB_OFFLINE or any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
                                       for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    return hub_unreachable_reason() is not None


def hub_unreachable_reason() -> str | None:
    """Why the hub cannot be reached (the probe of the module docstring, run once per process; an
    unreachable hub switches the process offline, with one warning), or None when it can."""
    if not _UNREACHABLE:
        from huggingface_hub import constants  # heavy: the CLI's --help needs no hub client

        why = _hub_unreachable(constants.ENDPOINT)
        _UNREACHABLE.append(why)
        if why is not None:
            LOG.warning("the hub (%s) cannot be reached (%s): working offline, as with HF_HUB_OFFLINE=1 (hub ids "
                        "are not checked)", constants.ENDPOINT, why)
            go_offline()
    return _UNREACHABLE[0]


def went_offline() -> str | None:
    """Why this process switched itself offline (the probe ran and failed), else None; never probes."""
    return _UNREACHABLE[0] if _UNREACHABLE else None


def go_offline() -> None:
    """Offline mode for this process and its children: ``HF_HUB_OFFLINE=1`` and the flags the hub
    libraries already read at import."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    from huggingface_hub import constants  # heavy: only when going offline

    constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets  # heavy, and already imported (checked just above)

        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True


def _hub_unreachable(endpoint: str, timeout: float = 3.0) -> str | None:
    """None when a TCP connection to the hub's host (or to the HTTPS proxy) opens within
    ``timeout`` seconds, else why not."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy if proxy else endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return None
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or type(exc).__name__}"


def cached_hub_file(repo_id: str, filename: str = "config.json") -> str | None:
    """The path of ``filename`` of a hub model in the local hub cache, or None."""
    try:
        from huggingface_hub import try_to_load_from_cache  # heavy: only when the hub cache is read

        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # not a valid repo id
        return None
    return found if isinstance(found, str) else None


def _safetensors_problem(path: str) -> str | None:
    """Why the safetensors file ``path`` is damaged (header unreadable, file shorter than its
    header says), or None. Reads the header only."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else 0
        if not 0 < length <= size - 8:
            return f"{size} bytes, not a whole safetensors file (truncated?)"
        try:
            header = json.loads(handle.read(length))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            return "its safetensors header is not valid (damaged file?)"
    if 8 + length + end > size:
        return f"{size:,} bytes, but its header describes {8 + length + end:,} (truncated: an interrupted copy?)"
    return None


def check_weight_files(folder: str, field: str) -> None:
    """Raise ``ValueError("<field>: <file>: ...")`` when a weight file of the model folder is
    damaged: a ``*.safetensors`` file shorter than its header says (or without a valid header), or
    a file named by ``*.index.json`` that is missing. Cheap: headers and sizes only."""
    names = sorted(os.listdir(folder))
    for name in names:
        path = os.path.join(folder, name)
        if name.endswith(".safetensors") and os.path.isfile(path):
            problem = _safetensors_problem(path)
            if problem:
                raise ValueError(f"{field}: {path}: {problem}; copy or download the model again")
        elif name.endswith(".index.json"):
            try:
                with open(path, encoding="utf-8") as handle:
                    shards = set((json.load(handle).get("weight_map") or {}).values())
            except (ValueError, AttributeError):
                raise ValueError(f"{field}: {path}: not a valid JSON weight index") from None
            missing = sorted(s for s in shards if not os.path.isfile(os.path.join(folder, s)))
            if missing:
                raise ValueError(f"{field}: {folder}: {name} names missing weight files ({', '.join(missing[:3])})")


@dataclass(frozen=True)
class ModelLocation:
    """A resolved model name: ``kind`` is ``local``, ``hub-cache`` (its config.json is in the
    local hub cache), ``hub`` (online, found on the hub) or ``unchecked`` (a hub id that cannot be
    checked offline); ``config`` is the readable config.json, when there is one."""

    name: str
    kind: str
    config: str | None = None
    note: str = ""

    @property
    def readable(self) -> bool:
        """Whether tokenizer and config files can be read without the network."""
        return self.kind in ("local", "hub-cache")

    @property
    def folder(self) -> str:
        """What ``from_pretrained`` takes to read it offline: the folder (local or cache snapshot)."""
        return self.name if self.kind == "local" else os.path.dirname(self.config or "")


def resolve_model(name: str, field: str, *, check_online: bool = True) -> ModelLocation:
    """Resolve a model name given in config field ``field`` without loading weights.

    Raises ``ValueError`` (``field: ...``) for a local-looking path that is not a model folder,
    and for a hub id the hub says does not exist. Offline, a hub id that is not in the local
    cache is ``unchecked``."""
    if looks_local(name):
        path = os.path.expanduser(name)
        if not os.path.isdir(path):
            raise ValueError(f"{field}: {name} does not exist (a local model folder is expected here)")
        config = os.path.join(path, "config.json")
        if not os.path.isfile(config):
            raise ValueError(f"{field}: {name} has no config.json (not a Hugging Face model folder)")
        check_weight_files(path, field)
        return ModelLocation(path, "local", config)
    cached = cached_hub_file(name)
    if cached:
        return ModelLocation(name, "hub-cache", cached, "hub id, config in the local hub cache")
    if hub_offline() or not check_online:
        return ModelLocation(name, "unchecked", None,
                             "hub id, not in the local hub cache; not checked (the hub is offline)")
    try:
        from huggingface_hub import HfApi  # heavy: only when the hub is asked

        info = HfApi().model_info(name, timeout=10)
    except Exception as exc:  # noqa: BLE001 - gated, missing, unreachable: say which
        kind = type(exc).__name__
        if kind in ("RepositoryNotFoundError", "HFValidationError"):
            raise ValueError(f"{field}: {name} is neither a local folder nor a model on the hub") from None
        return ModelLocation(name, "unchecked", None, f"hub id; the hub could not be asked ({kind})")
    return ModelLocation(name, "hub", None, f"hub id, revision {str(info.sha)[:12]}")
