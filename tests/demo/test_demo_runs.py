"""`axolotl-focus demo` runs and command line (axolotl_focus/demo/runs.py, cli.py): the logged
dicts, the run scheduler, thread counts and the demo's options."""

import os
import time

import pytest

from axolotl_focus.demo import logged_dicts


def test_logged_dicts_reads_axolotl_string_values():
    text = ("junk {'loss': '4.776', 'grad_norm': '1.5', 'learning_rate': '0.001', 'loss/ce': '4.7', 'epoch': '0.1'}\n"
            "\r 50%|#####| {'loss': 3.5, 'loss/focus': 0.25, 'note': 'x'} more\n"
            "{'train_runtime': '0.575', 'train_loss': '4.776'}\n")
    rows = logged_dicts(text)
    assert rows == [{"loss": 4.776, "grad_norm": 1.5, "learning_rate": 0.001, "loss/ce": 4.7, "epoch": 0.1},
                    {"loss": 3.5, "loss/focus": 0.25}]


def test_long_commands_take_a_thread_count():
    import torch

    from axolotl_focus.cli import THREADED, build_parser, set_threads

    for command in THREADED:
        extra = {"prune": [], "pairs": [], "eval": ["a=b"], "model": [],
                 "teacher-cache": ["cfg.yml", "--output", "x"]}[command]
        assert build_parser().parse_args([command, *extra, "--threads", "3"]).threads == 3
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, *extra, "--threads", "0"])
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        assert 1 <= set_threads(None) <= (os.cpu_count() or 1)
    finally:
        torch.set_num_threads(before)


def test_cli_parses_demo_options():
    from axolotl_focus.cli import build_parser

    args = build_parser().parse_args(["demo", "--quick", "--out", "x"])
    assert args.quick and args.out == "x" and args.force is None and args.progress
    assert build_parser().parse_args(["demo", "--force"]).force == []
    assert build_parser().parse_args(["demo", "--force", "train", "eval"]).force == ["train", "eval"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--force", "nonsense"])



def test_run_concurrently_keeps_shared_datasets_apart_until_prepared():
    """At most `jobs` runs at once; a run sharing its dataset with a running one waits until a run
    with that dataset has finished (it prepared axolotl's dataset cache); results come back whole."""
    import threading

    from axolotl_focus.demo import run_concurrently

    lock, log, active = threading.Lock(), [], set()
    items = [("ce", "sft"), ("kd", "sft"), ("focus", "sft"), ("repair", "pairs"), ("dpo", "dpo")]

    def work(name, key, slot):
        with lock:
            assert len(active) < 2 and slot not in {s for _, s in active}
            log.append(("start", name, {n for n, _ in active}))
            active.add((name, slot))
        time.sleep(0.05)
        with lock:
            active.discard((name, slot))
        return name.upper()

    done = list(run_concurrently(items, work, 2, dataset_key=lambda item: item[1]))
    assert sorted(done) == sorted((n, n.upper()) for n, _ in items)
    started = [(name, others) for _, name, others in log]
    assert started[0] == ("ce", set()) and started[1] == ("repair", {"ce"})  # kd waits for ce's cache
    assert max(len(others) for _, others in started) == 1
    assert dict(started)["kd"] != {"ce"} and "ce" not in dict(started)["focus"]
    assert [name for name, _ in run_concurrently(items, lambda n, k, s: n, 1, lambda i: i[1])] == [n for n, _ in items]
