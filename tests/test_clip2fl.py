"""CLIP2FL (method=clip2fl) on the tiny random CLIP of tests/test_clip.py: its two terms, the teacher, the server.

Expected values are written out as the authors' code computes them (its N × N SupConLoss_text, its KDLoss) or
with open_clip's own encoders. Tests needing open_clip skip without the extra.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from app_runs import metrics_rows
from in_process import run_in_process, run_off_and_secagg
from test_clip import IMAGE, clip_config, make_tiny_clip
from torch.nn import functional as F

from fedlt_app.clip.backbone import CLIP_MEAN, CLIP_STD
from fedlt_app.clip.classnames import CLASS_NAMES
from fedlt_app.config import ConfigError, resolve
from fedlt_app.methods.vision_language.clip2fl import (
    CLIP2FLClient,
    CLIP2FLServer,
    distillation_loss,
    text_contrastive_loss,
)
from fedlt_app.models import build_model

CNN_WIDTH = 128  # the cnn's feature width: the tiny CLIP here is as wide, so the text-guided term applies


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """test_clip's tiny CLIP at joint width 128."""
    return make_tiny_clip(tmp_path_factory.mktemp("clip128"), CNN_WIDTH)


def code_supcon_text(features: torch.Tensor, labels: torch.Tensor, text_rows: torch.Tensor, t: float):
    """The authors' SupConLoss_text, written out on its N × N matrix (row i of ``text_rows``: a text feature)."""
    n = features.shape[0]
    mask = (labels.view(-1, 1) == labels.view(1, -1)).double()
    logits = features.double() @ text_rows.double().T / t
    logits = logits - logits.max(dim=1, keepdim=True).values
    off_diagonal = 1 - torch.eye(n, dtype=torch.float64)
    mask = mask * off_diagonal
    single = (mask.sum(1) == 0).double()
    log_prob = logits - torch.log((torch.exp(logits) * off_diagonal).sum(1, keepdim=True))
    mean_pos = (mask * log_prob).sum(1) / (mask.sum(1) + single)
    loss = -mean_pos * (1 - single)
    return float(loss.sum() / (n - single.sum()))


def test_text_contrastive_loss_equals_the_codes_matrix_form() -> None:
    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    for labels in (torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2]), torch.tensor([0, 0, 1, 1, 1, 1, 2])):  # 2: single
        features = torch.randn(len(labels), 8, generator=g)
        got = float(text_contrastive_loss(features, labels, text, 0.1))
        assert got == pytest.approx(code_supcon_text(features, labels, text[labels], 0.1), rel=1e-5)


def test_distillation_loss_is_the_codes_kd() -> None:
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    p = F.softmax(teacher / 3, dim=1)
    expected = float((p * (torch.log(p) - F.log_softmax(student / 3, dim=1))).sum(1).mean() * 9)
    assert float(distillation_loss(student, teacher, 3.0)) == pytest.approx(expected, rel=1e-5)


def test_client_loss_distils_clips_zero_shot_logits(tiny_clip: tuple) -> None:
    """CE + α·KD with the teacher = exp(s)·cos(CLIP image, "a photo of a {class}") from open_clip directly."""
    import open_clip

    original, path = tiny_clip
    cfg = clip_config("clip2fl", path, dataset="cifar10", precision="fp32",
                      **{"clip2fl-alpha": 0.5, "clip2fl-temperature": 2.0})
    model = build_model("cnn", 10, 3, IMAGE)
    images = torch.randint(0, 256, (4, 3, IMAGE, IMAGE), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 3])
    client = CLIP2FLClient(cfg, 10, {})
    client.begin(model, images, labels, torch.Generator().manual_seed(0))
    x = images.float() / 255
    from fedlt_app.data import to_float

    normalised = to_float(images, "cifar10")
    with torch.no_grad():
        pixels = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        image = F.normalize(original.encode_image(pixels), dim=-1)
        text = F.normalize(original.encode_text(open_clip.tokenize(
            [f"a photo of a {n}" for n in CLASS_NAMES["cifar10"]])), dim=-1)
        teacher = original.logit_scale.exp() * image @ text.T
        model.eval()  # the same forward twice (BatchNorm statistics as the loss sees them)
        logits = model(normalised)
        expected = F.cross_entropy(logits, labels) + 0.5 * distillation_loss(logits, teacher, 2.0)
        got = client.loss(model, normalised, labels)
    assert float(got) == pytest.approx(float(expected), rel=1e-4)
    assert set(client.report()) == {"creff-classes", "creff-weight", "creff-bias"}  # CReFF's real gradients


def test_server_adds_the_text_term_and_refuses_mismatched_widths(tiny_clip: tuple) -> None:
    path = tiny_clip[1]
    with pytest.raises(ValueError, match="clip2fl-contrast-weight"):  # cnn-mcmahan's 512-d features vs 128
        CLIP2FLServer(clip_config("clip2fl", path, model="cnn-mcmahan"), build_model("cnn-mcmahan", 10, 1, 28), None)
    CLIP2FLServer(clip_config("clip2fl", path, model="cnn-mcmahan", **{"clip2fl-contrast-weight": 0.0}),
                  build_model("cnn-mcmahan", 10, 1, 28), None)
    keys = {"creff-features-per-class": 4, "clip2fl-contrast-weight": 0.25}
    server = CLIP2FLServer(clip_config("clip2fl", path, **keys), build_model("cnn", 10, 1, 28), None)
    g = torch.Generator().manual_seed(3)
    real = {c: (torch.randn(10, CNN_WIDTH, generator=g), torch.randn(10, generator=g)) for c in (0, 4)}
    from fedlt_app.methods.decoupled.creff import CReFFServer

    creff = CReFFServer.matching_loss(server, real)
    contrast = text_contrastive_loss(server.features, server.feature_labels, server.text, 0.1)
    assert float(server.matching_loss(real)) == pytest.approx(float(creff + 0.25 * contrast), rel=1e-5)
    assert server.round_metrics()["clip2fl_contrast_loss"] == pytest.approx(float(contrast), rel=1e-6)
    with pytest.raises(ConfigError, match="clip-weights"):
        resolve({"method": "clip2fl"})


def test_clip2fl_end_to_end(tiny_clip: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """2 clients, 2 rounds, the cnn (128-d features = this tiny CLIP's width): runs, evaluates, logs the term."""
    code = run_in_process(tmp_path, monkeypatch,
                          f"method='clip2fl' clip-weights='{tiny_clip[1]}' num-server-rounds=2 "
                          f"samples-per-class=6 imbalance-ratio=2.0 batch-size=16 creff-features-per-class=4 "
                          f"creff-match-steps=3 creff-retrain-epochs=2 output-dir='{tmp_path / 'out'}' run-name='c2'",
                          num_clients=2)
    assert code == 0
    rows = metrics_rows(tmp_path / "out" / "c2")
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["failed_clients"] == [] and 0.0 <= row["accuracy"] <= 1.0
        assert np.isfinite(row["clip2fl_contrast_loss"]) and np.isfinite(row["train_loss"])


def test_clip2fl_under_secure_aggregation_runs_as_creff(tiny_clip: tuple, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """CLIP2FL's server is CReFF's plus a server-side text term: under secagg its clients' real gradients travel as
    CReFF's per-class sums and holder counts, so it runs and scores as the plain run does."""
    runs = run_off_and_secagg(tmp_path, monkeypatch,
                              f"method='clip2fl' clip-weights='{tiny_clip[1]}' num-server-rounds=2 samples-per-class=6 "
                              "imbalance-ratio=2.0 batch-size=16 creff-features-per-class=4 creff-match-steps=3 "
                              "creff-retrain-epochs=2 precision='fp32'", run_name="c2")
    rows = {mode: metrics_rows(folder) for mode, folder in runs.items()}
    for plain, secure in zip(rows["off"], rows["secagg"], strict=True):
        assert secure["failed_clients"] == [] and np.isfinite(secure["clip2fl_contrast_loss"])
        assert abs(secure["accuracy"] - plain["accuracy"]) < 0.05
        assert secure["clip2fl_contrast_loss"] == pytest.approx(plain["clip2fl_contrast_loss"], rel=0.05)
