"""CLIP methods (zero-shot-clip, promptfl) on a tiny random CLIP saved in OpenAI's format.

The tiny model is built with open_clip, rounded through fp16 as OpenAI's
loader does, saved as a state dict with OpenAI's key names and read back by
the real loader (``open_clip.load_openai_model``), so the path a user's
ViT-B-16.pt takes is exercised offline. Expected values come from open_clip's
own ``encode_image`` / ``encode_text`` on the in-memory original, never from
fedlt's CLIP modules. Tests needing open_clip skip without the extra.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, RecordDict
from in_process import run_in_process, run_off_and_secagg
from torch.nn import functional as F

from fedlt_app.clip.backbone import CLIP_MEAN, CLIP_STD, CLIPUnavailable, load_clip, require_open_clip
from fedlt_app.clip.classnames import CLASS_NAMES
from fedlt_app.config import ConfigError, resolve
from fedlt_app.data import to_float
from fedlt_app.methods import ClientMethod
from fedlt_app.records import content_nbytes
from fedlt_app.train import LocalTraining, train_locally

SKIP_REASON = 'open_clip is absent: the CLIP methods need the optional extra (pip install -e ".[clip]")'
EMBED = 64  # text width = joint width of the tiny CLIP
IMAGE = 32


def make_tiny_clip(directory: Path, embed: int = EMBED) -> tuple[torch.nn.Module, Path]:
    """A tiny random CLIP of joint (= text) width ``embed``, saved in OpenAI's format under ``directory``.

    ``embed`` a multiple of 64: OpenAI's loader infers width/64 attention heads."""
    pytest.importorskip("open_clip", reason=SKIP_REASON)
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, convert_weights_to_fp16

    torch.manual_seed(0)
    model = CLIP(embed_dim=embed, vision_cfg=CLIPVisionCfg(layers=2, width=64, patch_size=8, image_size=IMAGE),
                 text_cfg=CLIPTextCfg(width=embed, heads=embed // 64, layers=2, vocab_size=49408, context_length=77),
                 quick_gelu=True)
    convert_weights_to_fp16(model)  # OpenAI's loader rounds through fp16: round first, reload is then exact
    model.float().eval()
    path = directory / "tiny-openai.pt"
    torch.save(model.state_dict(), path)
    return model, path


def clip_config(method: str, weights: Path, **extra: object) -> object:
    return resolve({"method": method, "clip-weights": str(weights), **extra})


def build(method: str, weights: Path, dataset: str, num_classes: int, **extra: object) -> torch.nn.Module:
    from fedlt_app.methods import get_method

    cfg = clip_config(method, weights, dataset=dataset, **extra)
    return get_method(method).build(cfg, SimpleNamespace(num_classes=num_classes), torch.device("cpu"))


# ---------------------------------------------------------------- loading, input transform


def test_real_loader_reads_the_tiny_archive_exactly(tiny_clip: tuple) -> None:
    original, path = tiny_clip
    loaded = load_clip(str(path))
    assert load_clip(str(path)) is loaded  # one CLIP per process and device
    assert all(not p.requires_grad for p in loaded.parameters())
    images = torch.rand(3, 3, IMAGE, IMAGE)
    tokens = torch.randint(1, 49000, (2, 77))
    theirs = original.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in loaded.state_dict().items())
    # same weights; the rebuilt module may take another kernel path (on an AVX2-only CPU the text tower's outputs
    # differed by 1.5e-6): float32 rounding, four orders below what a wrong weight or layer would change
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), original.encode_image(images), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(loaded.encode_text(tokens), original.encode_text(tokens), atol=1e-5, rtol=1e-4)


def test_grey_input_becomes_three_normalised_channels_at_the_towers_size(tiny_clip: tuple) -> None:
    """A constant grey image v stays constant through bicubic resizing: every output pixel is (v − μ_c)/σ_c."""
    model = build("zero-shot-clip", tiny_clip[1], "fmnist", 10)
    values = torch.tensor([0.0, 0.25, 1.0])
    x = values.view(3, 1, 1, 1).expand(3, 1, 28, 28).contiguous()  # fmnist's to_float: [0, 1], 28x28
    out = model.encoder.transform(x)
    assert out.shape == (3, 3, IMAGE, IMAGE)
    expected = (values.view(3, 1) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)  # (image, channel)
    torch.testing.assert_close(out.mean(dim=(2, 3)), expected)
    torch.testing.assert_close(out.amax(dim=(2, 3)) - out.amin(dim=(2, 3)), torch.zeros(3, 3), atol=1e-5, rtol=0)


def test_cifar_normalisation_is_undone_before_clips(tiny_clip: tuple) -> None:
    model = build("zero-shot-clip", tiny_clip[1], "cifar10", 10)
    raw = torch.randint(0, 256, (4, 3, IMAGE, IMAGE), dtype=torch.uint8)
    expected = (raw.float() / 255 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(model.encoder.transform(to_float(raw, "cifar10")), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- failing fast


def test_missing_weights_fail_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="clip-weights"):
        resolve({"method": "promptfl"})
    pytest.importorskip("open_clip", reason=SKIP_REASON)
    with pytest.raises(CLIPUnavailable, match=r"clip-weights: no file at .*ViT-B-16\.pt"):
        load_clip(str(tmp_path / "ViT-B-16.pt"))


def test_missing_extra_fails_naming_the_key_and_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "open_clip", None)  # what an install without the extra sees
    with pytest.raises(CLIPUnavailable, match=r'clip-weights: .*pip install -e "\.\[clip\]"'):
        require_open_clip()
    with pytest.raises(CLIPUnavailable, match="clip-weights"):
        load_clip("/anything.pt")


def test_class_names_match_the_label_sets() -> None:
    assert {k: len(v) for k, v in CLASS_NAMES.items()} == {"mnist": 10, "fmnist": 10, "cifar10": 10,
                                                              "cifar100": 100, "femnist": 62}
    assert len(set(CLASS_NAMES["cifar100"])) == 100
    assert list(CLASS_NAMES["cifar100"]) == sorted(CLASS_NAMES["cifar100"])  # CIFAR-100's fine labels: alphabetical
    assert CLASS_NAMES["femnist"][9:12] == ("9", "A", "B") and CLASS_NAMES["femnist"][36] == "a"


# ---------------------------------------------------------------- zero-shot and prompt heads


def direct_zero_shot_logits(original: torch.nn.Module, rgb: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    """CLIP's zero-shot classifier written out with open_clip's own encoders on 32x32 RGB input in [0, 1]."""
    import open_clip

    pixels = (rgb - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    tokens = open_clip.tokenize([f"a photo of a {name}." for name in names])
    with torch.no_grad():
        image = F.normalize(original.encode_image(pixels), dim=-1)
        text = F.normalize(original.encode_text(tokens), dim=-1)
        return original.logit_scale.exp() * image @ text.t()


def test_zero_shot_equals_the_direct_computation(tiny_clip: tuple) -> None:
    original, path = tiny_clip
    model = build("zero-shot-clip", path, "cifar10", 10).eval()
    raw = torch.randint(0, 256, (6, 3, IMAGE, IMAGE), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    expected = direct_zero_shot_logits(original, raw.float() / 255, CLASS_NAMES["cifar10"])
    with torch.no_grad():
        got = model(to_float(raw, "cifar10"))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert model.travelling_state() == {}


def test_prompt_context_set_to_a_phrase_reproduces_that_phrases_prompt(tiny_clip: tuple) -> None:
    """CoOp's splice: context = the token embeddings of "a photo of a" gives encode_text("a photo of a {c}.")."""
    import open_clip

    original, path = tiny_clip
    model = build("promptfl", path, "cifar10", 10, **{"promptfl-n-ctx": 4})
    phrase = open_clip.tokenize(["a photo of a"])[0, 1:5]
    with torch.no_grad():
        model.classifier.context.copy_(original.token_embedding(phrase))
        got = model.classifier.class_embeddings()
        expected = F.normalize(original.encode_text(
            open_clip.tokenize([f"a photo of a {n}." for n in CLASS_NAMES["cifar10"]])), dim=-1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_the_initial_context_does_not_depend_on_whether_clip_was_loaded_before(
        tiny_clip: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a secure and a plain run disagreeing: loading CLIP draws the architecture's random weights, so
    the first load in a process moved the global stream between ``initial_model``'s seed and the context's
    draw, and the round-0 model depended on the process's history. Loading now leaves the stream alone."""
    from fedlt_app.clip import backbone
    from fedlt_app.task import initial_model

    cfg = clip_config("promptfl", tiny_clip[1], **{"promptfl-n-ctx": 2})
    data = SimpleNamespace(num_classes=10)
    monkeypatch.setattr(backbone, "_BACKBONES", {})  # this process has loaded no CLIP yet
    first = initial_model(cfg, data).classifier.context.detach().clone()  # loads it
    again = initial_model(cfg, data).classifier.context.detach()  # finds it loaded
    torch.manual_seed(cfg.seed)
    expected = torch.randn(2, EMBED) * 0.02  # CoOp's N(0, 0.02²), the seed's first draws
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    torch.testing.assert_close(first, expected, rtol=0, atol=0)


def test_training_moves_only_the_context_and_only_the_context_travels(tiny_clip: tuple) -> None:
    model = build("promptfl", tiny_clip[1], "fmnist", 10, **{"promptfl-n-ctx": 3})
    frozen = {k: v.clone() for k, v in model.clip.state_dict().items()}
    context = model.classifier.context.detach().clone()
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (12, 1, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (12,), generator=g)
    cfg = clip_config("promptfl", tiny_clip[1], **{"promptfl-n-ctx": 3, "batch-size": 4, "local-lr": 0.5,
                                                    "precision": "fp32"})
    train_locally(model, images, labels, ClientMethod(cfg, 10, {}), LocalTraining.from_config(cfg),
                  torch.Generator().manual_seed(0))
    assert not torch.equal(model.classifier.context, context)
    assert all(torch.equal(v, frozen[k]) for k, v in model.clip.state_dict().items())
    assert not model.clip.training  # the frozen tower stays in eval mode through model.train()
    state = model.travelling_state()
    assert list(state) == ["classifier.context"] and state["classifier.context"].shape == (3, EMBED)
    assert content_nbytes(RecordDict({"arrays": ArrayRecord(state)})) == 3 * EMBED * 4
    other = build("promptfl", tiny_clip[1], "fmnist", 10, **{"promptfl-n-ctx": 3})
    other.load_travelling_state(state)
    assert torch.equal(other.classifier.context, model.classifier.context)
    with pytest.raises(KeyError, match="trainable state"):
        other.load_travelling_state({**state, "clip.logit_scale": torch.zeros(())})


# ---------------------------------------------------------------- end to end through the real apps (in process)


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_promptfl_end_to_end_sends_only_the_context(tiny_clip: tuple, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    n_ctx = 2
    code = run_in_process(tmp_path, monkeypatch,
                          f"method='promptfl' clip-weights='{tiny_clip[1]}' promptfl-n-ctx={n_ctx} num-server-rounds=2 "
                          f"samples-per-class=12 imbalance-ratio=2.0 local-lr=0.5 output-dir='{tmp_path / 'out'}' "
                          f"run-name='pfl'", num_clients=2)
    assert code == 0
    rows = rows_of(tmp_path / "out" / "pfl")
    assert [r["round"] for r in rows] == [1, 2]
    context_bytes = n_ctx * EMBED * 4  # float32 context, nothing of CLIP
    for row in rows:
        assert row["clients"] == [0, 1] and row["failed_clients"] == []
        assert row["bytes_up"] == row["bytes_down"] == 2 * context_bytes
        assert row["parameters_up"] == 2 * n_ctx * EMBED
        assert np.isfinite(row["train_loss"]) and 0.0 <= row["accuracy"] <= 1.0


def test_zero_shot_end_to_end_trains_nothing_and_matches_direct_evaluation(
    tiny_clip: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedlt_app.task import federated_data

    settings = {"samples-per-class": 12, "imbalance-ratio": 2.0}
    code = run_in_process(tmp_path, monkeypatch,
                          f"method='zero-shot-clip' clip-weights='{tiny_clip[1]}' num-server-rounds=2 "
                          f"samples-per-class=12 imbalance-ratio=2.0 output-dir='{tmp_path / 'out'}' run-name='zs'",
                          num_clients=2)
    assert code == 0
    rows = rows_of(tmp_path / "out" / "zs")
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["bytes_up"] == r["bytes_down"] == 0 and r["clients"] == [] for r in rows)
    # the server's number is the zero-shot classifier's on the same test set
    data = federated_data(clip_config("zero-shot-clip", tiny_clip[1], **settings), 2)
    images, labels = data.test_data()
    grey = images.float() / 255  # Fashion-MNIST: 1x28x28, to grey RGB at the tower's 32x32 (bicubic, clamped)
    rgb = F.interpolate(grey.expand(-1, 3, -1, -1), size=(IMAGE, IMAGE), mode="bicubic", align_corners=False)
    logits = direct_zero_shot_logits(tiny_clip[0], rgb.clamp(0, 1), CLASS_NAMES["fmnist"])
    accuracy = float((logits.argmax(dim=1) == labels).float().mean())
    assert rows[0]["accuracy"] == rows[1]["accuracy"] == pytest.approx(accuracy, abs=1e-9)


def test_promptfl_under_secure_aggregation_matches_a_plain_run(tiny_clip: tuple, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """PromptFL's server averages the context vectors, nothing else: under secagg they travel masked and the
    averaged context equals the plain run's up to the codec's steps (3 clients: secagg's smallest cohort)."""
    runs = run_off_and_secagg(tmp_path, monkeypatch,
                              f"method='promptfl' clip-weights='{tiny_clip[1]}' promptfl-n-ctx=2 num-server-rounds=2 "
                              "samples-per-class=12 imbalance-ratio=2.0 local-lr=0.5 precision='fp32'", run_name="pfl")
    contexts = {mode: torch.load(folder / "final_model.pt", weights_only=False)["state"]
                for mode, folder in runs.items()}
    assert sorted(contexts["secagg"]) == sorted(contexts["off"])
    for key, value in contexts["off"].items():
        np.testing.assert_allclose(contexts["secagg"][key].numpy(), value.numpy(), atol=1e-4, err_msg=key)
    for plain, secure in zip(rows_of(runs["off"]), rows_of(runs["secagg"]), strict=True):
        assert abs(secure["accuracy"] - plain["accuracy"]) < 0.05
