import json
import os

import pytest
import torch

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Teacher pretraining steps for the shared tiny models: enough for a non-trivial teacher.
TINY_TEACHER_STEPS = int(os.environ.get("FOCUS_TEST_TEACHER_STEPS", "120"))


@pytest.fixture(autouse=True)
def hub_probe(monkeypatch):
    """locations.hub_offline's probe says the hub is reachable, afresh in every test: a test that
    unsets HF_HUB_OFFLINE fakes the hub itself (and one test fakes it unreachable)."""
    from axolotl_focus import locations

    monkeypatch.setattr(locations, "_UNREACHABLE", [])
    monkeypatch.setattr(locations, "_hub_unreachable", lambda endpoint, timeout=3.0: None)


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """Tokenizer + GQA teacher + layer-dropped student (records its teacher) + train.jsonl."""
    from axolotl_focus.micro import build_tiny_pair

    return build_tiny_pair(tmp_path_factory.mktemp("tiny"), steps=TINY_TEACHER_STEPS)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP barriers make 2 threads far slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def plugin_manager():
    """axolotl's PluginManager is a process-wide singleton: start and end each test empty."""
    from axolotl.integrations.base import PluginManager

    manager = PluginManager.get_instance()
    manager.plugins.clear()
    yield manager
    manager.plugins.clear()


@pytest.fixture(scope="session")
def looping_micro(tmp_path_factory):
    """Tokenizer (vocab 384), a teacher pretrained on corpus text, and a student pretrained on one
    sentence repeated (it loops on any prompt under top-p sampling). Saved to disk as well: the
    student records the teacher as its focus_source_model."""
    from transformers import LlamaForCausalLM

    from axolotl_focus.micro import build_tokenizer, corpus_documents, llama_config, pretrain

    root = tmp_path_factory.mktemp("mining")
    docs = corpus_documents("valid")[:300]
    tokenizer = build_tokenizer(docs, vocab_size=384)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(llama_config(tokenizer, layers=2))
    pretrain(teacher, tokenizer, docs, steps=80, batch=8, seed=0)
    sentence = "It was one of the first in the state ."  # 16 tokens
    student = LlamaForCausalLM(llama_config(tokenizer, layers=2))
    pretrain(student, tokenizer, [" ".join([sentence] * 6)], steps=80, batch=8, seed=1)

    paths = {"teacher_path": str(root / "teacher"), "student_path": str(root / "student")}
    teacher.save_pretrained(paths["teacher_path"])
    tokenizer.save_pretrained(paths["teacher_path"])
    student.config.focus_source_model = paths["teacher_path"]
    student.save_pretrained(paths["student_path"])
    tokenizer.save_pretrained(paths["student_path"])
    prompts_file = root / "prompts.jsonl"
    with open(prompts_file, "w", encoding="utf-8") as handle:
        for i, doc in enumerate(docs[200:224]):
            handle.write(json.dumps({"id": f"doc-{i}", "text": doc}) + "\n")
    from axolotl_focus.sources import load_prompts

    prompts = load_prompts(str(prompts_file), id_field="id")
    return dict(tokenizer=tokenizer, teacher=teacher, student=student, prompts=prompts,
                prompts_file=str(prompts_file), **paths)
