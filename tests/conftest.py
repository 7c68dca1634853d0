import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # test helpers such as wandb_reader
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages built outside a running Flower app need a run identity: see ``in_process.give_task_identity``."""
    from in_process import give_task_identity

    give_task_identity(monkeypatch)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """(the in-memory tiny CLIP of test_clip, the OpenAI-format file it was saved to); one per test module."""
    from test_clip import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("clip"))
