"""The RePAIR pair stream (axolotl_focus/train/pair_stream.py): its seeded order, its placement over
micro-batches and ranks, the SFT batches it leaves alone, and the exact step it gives under
gradient accumulation and 2-process DDP."""

import os
import re
import subprocess
import sys

import focus_step
import pytest
import torch
from focus_step import LR, assert_params_equal, expected_params, stream_kwargs, stream_step_pairs, write_pairs

from axolotl_focus.train.losses import IGNORE_INDEX
from axolotl_focus.train.pair_stream import PairStream, append_pairs, pair_order, slots


def stream(n=5, per_step=3, seed=0):
    return PairStream([([1, i], [2, i], [3, i]) for i in range(n)], per_step, seed)


def test_every_pair_once_per_pass_in_a_seeded_order():
    s = stream(n=5, per_step=3)
    drawn = [i for step in range(5) for i in s.step_pairs(step)]  # 15 draws = 3 passes over 5 pairs
    for p in range(3):
        assert sorted(drawn[5 * p : 5 * p + 5]) == [0, 1, 2, 3, 4]
        assert drawn[5 * p : 5 * p + 5] == list(pair_order(5, 0, p))
    assert drawn[:5] != drawn[5:10] or drawn[5:10] != drawn[10:15]  # a new order each pass
    assert drawn == [i for step in range(5) for i in stream(n=5, per_step=3).step_pairs(step)]  # deterministic
    assert drawn != [i for step in range(5) for i in stream(n=5, per_step=3, seed=1).step_pairs(step)]


def test_torch_random_state_is_neither_read_nor_advanced():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = stream().step_pairs(7)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(999)
    assert stream().step_pairs(7) == first


@pytest.mark.parametrize("per_step,micro,world", [(3, 1, 1), (3, 2, 1), (4, 2, 2), (2, 2, 2), (5, 1, 2)])
def test_the_step_pairs_are_shared_out_over_micro_batches_and_ranks(per_step, micro, world):
    parts = slots(per_step, micro, world)
    assert sorted(i for part in parts for i in part) == list(range(per_step))
    s = stream(n=7, per_step=per_step)
    got = [p for a in range(micro) for r in range(world) for p in s.for_micro_batch(4, a, micro, r, world)]
    assert sorted(got) == sorted(s.pairs[i] for i in s.step_pairs(4))


@pytest.mark.parametrize("side", ["right", "left"])
def test_append_pairs_adds_two_rows_per_pair_with_repair_targets(side):
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    batch = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
             "labels": torch.tensor([[5, 6, 7], [8, 9, -100]])}
    out = append_pairs(batch, [([1, 2], [3, 4, 5], [6]), ([1], [7], [8, 8])], pad_id=0, padding_side=side)
    assert out["input_ids"].shape == (6, 5)
    assert out["repair_chosen"].tolist() == [2, 4] and out["repair_rejected"].tolist() == [3, 5]
    rows = [r[m.bool()].tolist() for r, m in zip(out["input_ids"], out["attention_mask"])]
    assert rows == [[5, 6, 7], [8, 9], [1, 2, 3, 4, 5], [1, 2, 6], [1, 7], [1, 8, 8]]
    assert (out["labels"][2:] == IGNORE_INDEX).all()  # pair rows add nothing to CE
    assert (out["repair_labels"][:2] == IGNORE_INDEX).all()
    targets = [r[r != IGNORE_INDEX].tolist() for r in out["repair_labels"][2:]]
    assert targets == [[3, 4, 5], [6], [7], [8, 8]]
    # a batch that already holds pairs (the dataset-type way) keeps them, indices unchanged
    again = append_pairs(out, [([1], [2], [3])], pad_id=0, padding_side=side)
    assert again["repair_chosen"].tolist() == [2, 4, 6] and again["repair_rejected"].tolist() == [3, 5, 7]


def test_load_checks_rows_and_fits_them_into_sequence_len(tmp_path, tokenizer):
    path = write_pairs(tmp_path / "pairs.jsonl")
    s = PairStream.load(path, tokenizer, 12, per_step=2, seed=0)
    assert len(s.pairs) == 3
    assert all(len(p) + len(c) + len(r) <= 12 for p, c, r in s.pairs)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"prompt": "x", "chosen": "", "rejected": "y"}\n')
    with pytest.raises(ValueError, match=r"pairs\.jsonl:4: RePAIR pair row: empty chosen continuation"):
        PairStream.load(path, tokenizer, 64, per_step=2, seed=0)
    assert len(PairStream.load(path, tokenizer, 64, per_step=2, seed=0, skip_bad_rows=True).pairs) == 3
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"prompt": "x", "chosen": "", "rejected": "y"}\n')
    with pytest.raises(ValueError, match="holds no usable RePAIR pair"):
        PairStream.load(str(empty), tokenizer, 64, per_step=2, seed=0, skip_bad_rows=True)


@pytest.fixture
def tokenizer(tiny_pair):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_pair["student"])


def _record_steps(trainer):
    """Per compute_loss call: the SFT rows (token ids of rows with CE targets) and the pair rows."""
    seen = []
    inner = trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        sft = [r[m.bool()].tolist() for r, m, lab in zip(inputs["input_ids"], inputs["attention_mask"],
                                                        inputs["labels"]) if (lab != IGNORE_INDEX).any()]
        chosen = inputs.get("repair_chosen", torch.zeros(0, dtype=torch.long)).tolist()
        seen.append((sft, len(chosen)))
        return inner(model, inputs, *args, **kwargs)

    trainer.compute_loss = compute_loss
    return seen


def test_a_run_with_pairs_sees_exactly_the_sft_batches_of_a_run_without(tiny_pair, tmp_path):
    """Same seed and SFT data, 6 steps of 2 rows over 4 rows (3 passes, reshuffled): the SFT rows of
    every micro-batch are the same with and without the stream, and every step gets its 3 pairs."""
    tiny_dir = os.path.dirname(tiny_pair["student"])
    pairs_file = write_pairs(tmp_path / "pairs.jsonl")
    runs = {}
    for name, extra in (("plain", {}), ("stream", stream_kwargs(pairs_file, 3))):
        trainer = focus_step.make_trainer(tiny_dir, str(tmp_path / name), per_device=1, accum=2, max_steps=6,
                                          lr=1e-3, **extra)
        runs[name] = _record_steps(trainer)
        trainer.train()
    plain, streamed = runs["plain"], runs["stream"]
    assert len(plain) == len(streamed) == 12
    assert [sft for sft, _ in plain] == [sft for sft, _ in streamed]
    assert len({tuple(map(tuple, sft)) for sft, _ in plain[::2]}) > 1  # the SFT order does change over passes
    assert all(n == 0 for _, n in plain)
    per_step = [streamed[2 * k][1] + streamed[2 * k + 1][1] for k in range(6)]
    assert per_step == [3] * 6  # the dose: 3 pairs every optimizer step, split 2 + 1 over the micro-batches


@pytest.mark.parametrize("per_device,accum", [(4, 1), (2, 2), (1, 4)])
def test_gradient_accumulation_is_exact_with_the_pair_stream(tiny_pair, tmp_path, per_device, accum):
    """One SGD step = (CE + alpha_1 FOCUS) / all tokens + alpha_2 * mean hinge over the step's 3 pairs."""
    tiny_dir = os.path.dirname(tiny_pair["student"])
    pairs_file = write_pairs(tmp_path / "pairs.jsonl")
    want, want_loss = expected_params(tiny_dir, pairs=stream_step_pairs(tiny_dir, pairs_file, 3), margin=5.0)
    plain, _ = expected_params(tiny_dir)
    assert any(not torch.allclose(want[k], plain[k], atol=1e-5) for k in want)  # the pairs move the step
    out = tmp_path / "step.pt"
    focus_step.run(tiny_dir, str(out), per_device, accum, lr=LR, pairs_file=pairs_file, pairs_per_step=3)
    result = torch.load(out)
    assert_params_equal(result["params"], want)
    log = result["logs"][0]
    assert log["loss"] == pytest.approx(want_loss, rel=1e-3)
    assert {"loss/ce", "loss/focus", "loss/repair", "loss/repair_nll_chosen"} <= log.keys()


@pytest.mark.slow
def test_two_process_ddp_with_the_pair_stream_matches_the_reference(tiny_pair, tmp_path):
    """torchrun --nproc_per_node 2 (gloo), 2 rows and 1-2 of the step's 3 pairs per rank."""
    tiny_dir = os.path.dirname(tiny_pair["student"])
    pairs_file = write_pairs(tmp_path / "pairs.jsonl")
    want, want_loss = expected_params(tiny_dir, pairs=stream_step_pairs(tiny_dir, pairs_file, 3), margin=5.0)
    out = tmp_path / "ddp.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29537",
           focus_step.__file__, tiny_dir, str(out), "--per-device", "2", "--pairs", pairs_file, "--pairs-per-step", "3"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = torch.load(out)
    assert_params_equal(result["params"], want)
    assert result["logs"][0]["loss"] == pytest.approx(want_loss, rel=1e-3)


def test_validate_checks_and_describes_the_stream(tiny_pair, tmp_path, plugin_manager, capsys):
    import yaml
    from test_plugin import tiny_config

    from axolotl_focus.cli import main

    cfg = tiny_config(tiny_pair, tmp_path) | {"focus_repair_pairs": write_pairs(tmp_path / "pairs.jsonl"),
                                              "focus_repair_pairs_per_step": 2}
    path = tmp_path / "ok.yml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"3 pairs checked(, prompts measured against sequence_len \d+)?, drawn 2 per optimizer step "
                     r"apart from the SFT data", out)
    assert "RePAIR x1.0 (margin 1.0, 2 pairs per step)" in out
