import os

import pytest

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Teacher pretraining steps for the shared tiny models: enough for a non-trivial teacher.
TINY_TEACHER_STEPS = int(os.environ.get("FOCUS_TEST_TEACHER_STEPS", "120"))


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """Tokenizer + GQA teacher + layer-dropped student (records its teacher) + train.jsonl."""
    from axolotl_focus.micro import build_tiny_pair

    return build_tiny_pair(tmp_path_factory.mktemp("tiny"), steps=TINY_TEACHER_STEPS)


@pytest.fixture
def plugin_manager():
    """axolotl's PluginManager is a process-wide singleton: start and end each test empty."""
    from axolotl.integrations.base import PluginManager

    manager = PluginManager.get_instance()
    manager.plugins.clear()
    yield manager
    manager.plugins.clear()
