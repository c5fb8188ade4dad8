"""Checks before any work: what `axolotl-focus validate` reports, and what `axolotl train` runs
first (in the plugin's ``register`` hook, before axolotl validates, prunes, tokenizes or loads).

:func:`check_config` loads no weights and writes nothing. It runs, in this order, each part's
``check(cfg, account)`` into one :class:`~axolotl_focus.account.Account` (every problem collected,
each error naming ``config.yml:LINE: key``):

1. the config's own (:func:`axolotl_focus.config.check`): the plugin listed (``validate`` only), an
   unknown top-level ``focus_*`` key (with the nearest valid one: axolotl drops keys no schema
   declares, so a typo would silently train with the default), every number finite, the values
   against :class:`~axolotl_focus.config.FocusArgs`;
2. the prune stage's (:func:`axolotl_focus.prune.check`): the ``focus_prune:`` settings (an unknown
   key with the nearest valid one) and, against ``base_model``'s config, their plan (layer ranges,
   GQA groups, the parameter cut) and whether the pruned checkpoint is cached (keyed by the source's
   weights);
3. the train stage's (:func:`axolotl_focus.train.check`): ``base_model`` and the teacher
   (``focus_teacher_model``, else the ``focus_prune`` source, else the ``focus_source_model`` a
   pruned ``base_model`` records) resolvable - a local path must be a model folder, a hub id must
   exist when the hub can be asked (offline and not in the local hub cache: said so, and ``axolotl
   train`` stops there, since it could not load it) - and sharing one vocabulary (tokenizer files and
   configs only); or, with ``focus_teacher_cache``, that cache complete and built for this config and
   student (no shard is read); the local datasets readable and the rows of RePAIR / DPO pair files
   and of ``focus_repair_pairs`` valid (``file:line`` of the first bad row, or a missing file); the
   loss ``train`` would compute.

:func:`validate_file` (``axolotl-focus validate``) adds axolotl's own schema with the plugin merged
(GPU capability checks only where a GPU is present: they run again at ``axolotl train`` on the
training machine) and renders the account: the errors, and what ``train`` would do (student,
teacher or teacher cache, pruning cache hit or miss, loss terms, datasets).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
from typing import Any, Mapping

import yaml
from pydantic import ValidationError

from . import config, prune, train
from .account import Account, validation_messages
from .config import PLUGIN, FocusArgs
from .config_file import key_lines, read_config

LOG = logging.getLogger(__name__)


def check_config(cfg: Mapping, path: str = "", *, train: bool, lines: Mapping[str, int] | None = None) -> Account:
    """Every check of the module docstring that needs no weights, on a raw config mapping (``lines``:
    the line of each key in ``path``).

    ``train``: as run by ``axolotl train`` (a hub model that cannot be loaded offline is an error,
    not a note; axolotl validates its own schema afterwards). Returns the :class:`Account`."""
    account = Account(path, where=lines or {}, train=train)
    for check in checks():
        check(cfg, account)
    return account


def checks() -> tuple:
    """Each part's ``check(cfg, account)``, in the order they run: the config's, then the stages'
    (their packages' public API, imported on first use)."""
    return config.check, prune.check, train.check


def axolotl_schema_errors(cfg: Mapping, lines: Mapping[str, int]) -> list[tuple[str, str]]:
    """axolotl's own validation of the config with the plugins' schemas merged, run without the
    plugin's pruning (``focus_prune`` is planned, not run). ``(key, message)`` per problem."""
    import torch  # heavy: axolotl's schema needs it anyway
    from axolotl.integrations.base import PluginManager  # heavy: axolotl, only for validate
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    cfg = DictDefault(copy.deepcopy(dict(cfg)))
    manager = PluginManager.get_instance()
    for name in cfg.get("plugins") or []:
        manager.register(name)
        plugin = manager.plugins.get(name)
        if plugin is not None and name != PLUGIN:
            plugin.register(cfg)
    if cfg.get("focus_prune") and cfg.get("base_model"):  # what apply_to_config would set
        cfg["focus_pruned_from"] = cfg["base_model"]
        cfg["focus_teacher_model"] = cfg.get("focus_teacher_model") or cfg["base_model"]
    capabilities = {}
    if torch.cuda.is_available():
        from axolotl.cli.config import gpu_capabilities  # heavy: axolotl, only on a GPU machine

        capabilities = dict(zip(("capabilities", "env_capabilities"), gpu_capabilities()))
    try:
        validate_config(cfg, **capabilities)
    except ValidationError as exc:
        return [(key if key != "config" else "axolotl", msg) for key, msg in validation_messages(exc, schema=FocusArgs)]
    except ValueError as exc:
        return [("axolotl", str(exc))]
    return []


def validate_file(path: str) -> Account:
    """`axolotl-focus validate CONFIG.yml`: :func:`check_config` plus axolotl's schema."""
    import torch  # heavy: only to say whether GPU checks ran

    cfg, lines = read_config(path)
    account = check_config(cfg, path, train=False, lines=lines)
    if PLUGIN in (cfg.get("plugins") or []):
        for key, msg in axolotl_schema_errors(cfg, lines):
            if not any(f": {key}: " in e for e in account.errors):  # already said by our own checks
                account.error(key, msg)
        gpu = "" if torch.cuda.is_available() else "; GPU capability checks (bf16, flash attention) run at train time"
        account.say("axolotl", "schema checked with the plugin merged" + gpu)
    return account


def check_before_training(cfg: Any) -> Account:
    """The plugin's ``register`` hook under ``axolotl train``: raise one ``ValueError`` with every
    problem, before axolotl validates, prunes, tokenizes or loads anything; else log what train will
    do and return the account (its validated ``focus_prune`` settings: ``account.prune``)."""
    path = str(cfg.get("axolotl_config_path") or "")
    lines = {}
    if path and os.path.isfile(path):
        try:
            lines = key_lines(path)  # a key given twice raises here (axolotl loaded the file keeping the last)
        except yaml.YAMLError:
            pass
    account = check_config(cfg, path, train=True, lines=lines)
    account.raise_errors()
    for topic, text in account.lines:
        LOG.info("axolotl_focus %s: %s", topic, text)
    return account


def add_validate_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``axolotl-focus validate``."""
    parser.add_argument("config", help="the axolotl config (.yml) with plugins: [axolotl_focus.FocusPlugin]")


def run_validate_cli(args: argparse.Namespace) -> int:
    """``axolotl-focus validate``: print the account; 0 valid, 1 invalid."""
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")  # axolotl's telemetry retries for minutes offline
    account = validate_file(args.config)
    print(account.render())
    return 1 if account.errors else 0
