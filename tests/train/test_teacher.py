"""Teacher placement (DeepSpeed branches, unit-tested on CPU) and the vocabulary check."""

import os

import pytest
import torch

from axolotl_focus.train.teacher import (
    place_teacher,
    resolve_dtype,
    teacher_deepspeed_config,
    teacher_placement,
)
from axolotl_focus.vocabulary import check_teacher_before_loading, check_vocab_compat

ZERO3 = {
    "zero_optimization": {"stage": 3, "overlap_comm": True, "stage3_gather_16bit_weights_on_model_save": True},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW"},
    "scheduler": {"type": "WarmupLR"},
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
}


def test_placement_branches():
    assert teacher_placement(None) == "device"
    assert teacher_placement({}) == "device"
    assert teacher_placement({"zero_optimization": {"stage": 1}}) == "deepspeed"
    assert teacher_placement({"zero_optimization": {"stage": 2}}) == "deepspeed"
    assert teacher_placement(ZERO3) == "zero3"


def test_zero3_teacher_stays_sharded_inference_only():
    cfg = teacher_deepspeed_config(ZERO3, hidden_size=4096)
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 10 * 4096
    assert "optimizer" not in cfg and "scheduler" not in cfg
    assert "train_micro_batch_size_per_gpu" not in cfg  # 'auto' cannot be resolved for a teacher
    assert ZERO3["zero_optimization"].get("stage3_param_persistence_threshold") is None  # input untouched


def test_zero2_teacher_is_replicated_with_stage_0():
    cfg = teacher_deepspeed_config({**ZERO3, "zero_optimization": {"stage": 2}}, hidden_size=64)
    assert cfg["zero_optimization"] == {"stage": 0}
    assert cfg["bf16"] == {"enabled": "auto"}


def test_place_teacher_without_deepspeed_moves_to_device():
    class State:
        deepspeed_plugin = None

    class Accel:
        state = State()
        device = torch.device("cpu")

    model = torch.nn.Linear(2, 2)
    assert place_teacher(model, Accel()) is model


def test_dtype_resolution():
    assert resolve_dtype("auto", bf16=True, fp16=False) is torch.bfloat16
    assert resolve_dtype("auto", bf16=False, fp16=True) is torch.float16
    assert resolve_dtype("auto", bf16=False, fp16=False) is torch.float32
    assert resolve_dtype("float32", bf16=True, fp16=False) is torch.float32


def test_vocab_check(tiny_pair):
    from transformers import AutoTokenizer

    from axolotl_focus.micro import build_tokenizer, corpus_documents

    same = AutoTokenizer.from_pretrained(tiny_pair["teacher"])
    check_vocab_compat(same, AutoTokenizer.from_pretrained(tiny_pair["student"]), len(same), len(same))
    check_teacher_before_loading(tiny_pair["student"], None, tiny_pair["teacher"])
    with pytest.raises(ValueError, match="lm_head rows: student 1024, teacher 1000"):
        check_vocab_compat(student_vocab=1024, teacher_vocab=1000)
    other = build_tokenizer(corpus_documents("test")[:200], vocab_size=len(same))
    with pytest.raises(ValueError, match="focus_teacher_model: the teacher does not share"):
        check_vocab_compat(same, other, len(same), len(other))
    other.save_pretrained(tiny_pair["teacher"] + "-othertok")
    import shutil

    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny_pair["teacher"], name), tiny_pair["teacher"] + "-othertok")
    with pytest.raises(ValueError, match="token ids of"):
        check_teacher_before_loading(tiny_pair["student"], None, tiny_pair["teacher"] + "-othertok")
