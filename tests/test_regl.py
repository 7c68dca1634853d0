"""ReGL (synthetic-data=regl) on a tiny random Stable-Diffusion-shaped pipeline saved in the test.

The pipeline is built from config (diffusers' own fast-test sizes), with a CLIP tokenizer whose vocabulary
is the 512 byte-level symbols and no merges (written here: the real vocabulary is not offline), saved with
``save_pretrained`` and read back by the loader real weights take (``from_pretrained``, local files only).
Tests needing diffusers skip without the extra.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from in_process import run_in_process

from fedlt_app.config import ConfigError, resolve
from fedlt_app.data import FederatedData, ImageDataset
from fedlt_app.generative import synthetic as synthetic_module
from fedlt_app.generative.pipeline import GeneratorUnavailable, generator_dir, require_diffusers
from fedlt_app.generative.shortfall import class_counts, shortfall, targets
from fedlt_app.generative.synthetic import (
    class_prompts,
    synthetic_data,
    to_dataset_images,
    with_synthetic,
)

SKIP_REASON = 'diffusers is absent: synthetic-data=regl needs the optional extra (pip install -e ".[regl]")'
STEPS = 2  # denoising steps: mechanics only


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which CLIP's BPE vocabulary is written in."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def save_tiny_pipeline(directory: Path) -> Path:
    """A random Stable-Diffusion-shaped pipeline (32-px images) written with save_pretrained."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>",
                                                                                   "<|endoftext|>"])}
    words = directory / "bpe"
    words.mkdir(parents=True)
    (words / "vocab.json").write_text(json.dumps(vocab))
    (words / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(words / "vocab.json"), str(words / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                        num_hidden_layers=2, vocab_size=len(vocab),
                                        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                                        pad_token_id=vocab["<|endoftext|>"]))
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer,
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    folder = directory / "tiny-sd"
    pipe.save_pretrained(folder)
    return folder


# Generation and LoRA on each device present: the CPU everywhere, a GPU where one is visible (fp16 there).
DEVICES = [pytest.param(torch.device("cpu"), id="cpu"),
           pytest.param(torch.device("cuda"), id="cuda",
                        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("diffusers", reason=SKIP_REASON)
    pytest.importorskip("peft", reason=SKIP_REASON)
    return save_tiny_pipeline(tmp_path_factory.mktemp("regl"))


@pytest.fixture(autouse=True)
def fresh_memo() -> None:
    synthetic_module._LOADED.clear()  # each test sees the disk cache, not a previous test's in-process copy


def regl_config(pipeline: Path, cache: Path, **extra: object):
    return resolve({"synthetic-data": "regl", "regl-generator": str(pipeline), "regl-cache-dir": str(cache),
                    "regl-steps": STEPS, "dataset": extra.pop("dataset", "fmnist"), **extra})


def client_data(dataset: str, shape: tuple[int, int, int], counts: list[int],
                global_counts: list[int] | None = None) -> tuple[FederatedData, torch.Tensor, torch.Tensor]:
    """A one-client FederatedData holding ``counts[c]`` random images of class c."""
    g = torch.Generator().manual_seed(5)
    labels = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(counts)])
    images = torch.randint(0, 256, (len(labels), *shape), dtype=torch.uint8, generator=g)
    holder = ImageDataset(name=dataset, num_classes=len(counts), train_images=images, train_labels=labels,
                          test_images=images[:0], test_labels=labels[:0])
    everything = np.arange(len(labels))
    data = FederatedData(dataset=holder, train_indices=everything,
                         class_counts=tuple(global_counts or counts), client_indices=(everything,))
    return data, images, labels


# ---------------------------------------------------------------- shortfall arithmetic


def test_shortfall_for_each_target() -> None:
    counts = [9, 3, 0, 12, 1]  # class 2 is missing, 1 and 4 are minorities
    assert shortfall(counts, "balanced-max").tolist() == [3, 9, 12, 0, 11]
    assert shortfall(counts, "fixed", per_class=5).tolist() == [0, 2, 5, 0, 4]
    assert shortfall(counts, "fixed", per_class=0).tolist() == [0] * 5  # at or above target: nothing
    # global prior 100:50:25:100:10 scaled to the client's largest class (12): tau = 12, 6, 3, 12, 1.2 -> 1
    prior = [100, 50, 25, 100, 10]
    assert targets(counts, "global-prior", global_counts=prior).tolist() == [12, 6, 3, 12, 1]
    assert shortfall(counts, "global-prior", global_counts=prior).tolist() == [3, 3, 3, 0, 0]
    # a uniform prior is balanced-max; only the summed histogram's shape matters, not its scale
    uniform = shortfall(counts, "global-prior", global_counts=[7] * 5)
    assert uniform.tolist() == shortfall(counts, "balanced-max").tolist()
    assert (shortfall(counts, "global-prior", global_counts=[3 * p for p in prior])
            == shortfall(counts, "global-prior", global_counts=prior)).all()
    assert class_counts([0, 2, 2], 4).tolist() == [1, 0, 2, 0]
    with pytest.raises(ValueError, match="regl-target"):
        shortfall(counts, "global-prior")
    with pytest.raises(ValueError, match="regl-target"):
        shortfall(counts, "nearest")


# ---------------------------------------------------------------- failing fast


def test_config_fails_fast_naming_the_key() -> None:
    assert resolve({}).synthetic_data == "off"
    with pytest.raises(ConfigError, match="regl-generator"):
        resolve({"synthetic-data": "regl"})
    with pytest.raises(ConfigError, match="synthetic-data: must be one of off, regl"):
        resolve({"synthetic-data": "yes"})
    with pytest.raises(ConfigError, match="regl-target: must be one of balanced-max, fixed, global-prior"):
        resolve({"regl-target": "max"})
    with pytest.raises(ConfigError, match=r"regl-prompt: must contain \{class\}"):
        resolve({"regl-prompt": "a photo"})
    with pytest.raises(ConfigError, match="regl-weight-count"):
        resolve({"regl-weight-count": "synthetic"})
    with pytest.raises(ConfigError, match="al-method"):
        resolve({"synthetic-data": "regl", "regl-generator": "/x", "al-method": "random"})


def test_missing_extra_fails_naming_the_key_and_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)  # what an install without the extra sees
    with pytest.raises(GeneratorUnavailable, match=r'regl-generator: .*pip install -e "\.\[regl\]"'):
        require_diffusers()


def test_missing_folder_fails_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(GeneratorUnavailable, match="regl-generator: no folder at"):
        generator_dir(str(tmp_path / "sd-v1-5"))
    with pytest.raises(GeneratorUnavailable, match="regl-generator: .* has no model_index.json"):
        generator_dir(str(tmp_path))
    with pytest.raises(GeneratorUnavailable, match="regl-generator: empty"):
        generator_dir("")


# ---------------------------------------------------------------- loading, conversion, generation


def test_offline_loading_gives_the_saved_pipeline(tiny_pipeline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import StableDiffusionPipeline

    from fedlt_app.generative.pipeline import load_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tiny_pipeline.parent / "empty-hf-home"))  # nothing cached to fall back on
    pipe = load_pipeline(str(tiny_pipeline), torch.device("cpu"))
    assert isinstance(pipe, StableDiffusionPipeline) and pipe.safety_checker is None
    again = load_pipeline(str(tiny_pipeline), torch.device("cpu"))
    saved = {k: v for k, v in pipe.unet.state_dict().items()}
    assert all(torch.equal(v, saved[k]) for k, v in again.unet.state_dict().items())


def test_conversion_to_the_data_sets_images() -> None:
    rgb = torch.zeros(2, 3, 64, 64)
    rgb[0, 0] = 1.0  # pure red
    rgb[1] = 0.6  # grey
    grey = to_dataset_images(rgb, (1, 28, 28))
    assert grey.shape == (2, 1, 28, 28) and grey.dtype == torch.uint8
    assert grey[0].unique().tolist() == [round(0.299 * 255)] and grey[1].unique().tolist() == [153]
    colour = to_dataset_images(rgb, (3, 32, 32))
    assert colour.shape == (2, 3, 32, 32) and colour[0, :, 5, 5].tolist() == [255, 0, 0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dataset", "shape"), [("fmnist", (1, 28, 28)), ("cifar10", (3, 32, 32))])
def test_generated_images_have_the_data_sets_shape_and_labels(tiny_pipeline: Path, tmp_path: Path, dataset: str,
                                                              shape: tuple[int, int, int],
                                                              device: torch.device) -> None:
    counts = [5, 0, 2, 5, 1, 5, 4, 0, 3, 5]
    data, images, labels = client_data(dataset, shape, counts)
    cfg = regl_config(tiny_pipeline, tmp_path, dataset=dataset)
    mixed_images, mixed_labels, synthetic = with_synthetic(cfg, data, images, labels, 0, device)
    assert synthetic is not None and synthetic.num_real == len(labels) and not synthetic.cached
    assert synthetic.images.dtype == torch.uint8 and tuple(synthetic.images.shape[1:]) == shape
    assert class_counts(synthetic.labels, 10).tolist() == [5 - n for n in counts]
    assert mixed_images.shape == (50, *shape) and class_counts(mixed_labels, 10).tolist() == [5] * 10
    assert torch.equal(mixed_images[: len(labels)], images)  # the real images first, untouched
    assert synthetic.images.float().std() > 0  # not blank
    off = resolve({"dataset": dataset})
    assert with_synthetic(off, data, images, labels, 0, device)[2] is None


@pytest.mark.parametrize("device", DEVICES)
def test_images_depend_only_on_seed_client_class_and_index(tiny_pipeline: Path, tmp_path: Path,
                                                           device: torch.device) -> None:
    data, images, labels = client_data("fmnist", (1, 28, 28), [3, 0, 3, 3, 3, 3, 3, 3, 3, 3])
    cfg = regl_config(tiny_pipeline, tmp_path / "a")
    first = synthetic_data(cfg, data, images, labels, 4, device)  # class 1 only, three images
    assert first.labels.tolist() == [1, 1, 1]
    # other classes missing too, other batching, another cache: class 1's images are the same
    data2, images2, labels2 = client_data("fmnist", (1, 28, 28), [3, 0, 1, 3, 3, 3, 3, 3, 3, 3])
    second = synthetic_data(regl_config(tiny_pipeline, tmp_path / "b", **{"regl-batch-size": 2}), data2, images2,
                            labels2, 4, device)
    assert second.labels.tolist() == [1, 1, 1, 2, 2]
    assert (second.images[:3].int() - first.images.int()).abs().max() <= 1  # batching: float noise at most
    other_client = synthetic_data(regl_config(tiny_pipeline, tmp_path / "c"), data, images, labels, 5, device)
    other_seed = synthetic_data(regl_config(tiny_pipeline, tmp_path / "d", seed=1), data, images, labels, 4, device)
    assert not torch.equal(other_client.images, first.images) and not torch.equal(other_seed.images, first.images)
    assert class_prompts("A photo of {class}", "cifar10", 10)[3] == "A photo of cat"


# ---------------------------------------------------------------- the cache


def cache_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("regl-*.npz"))


def test_the_cache_is_reused_and_invalidated(tiny_pipeline: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    device = torch.device("cpu")
    data, images, labels = client_data("fmnist", (1, 28, 28), [4, 1, 4, 4, 4, 0, 4, 4, 4, 4])
    cache = tmp_path / "cache"
    cfg = regl_config(tiny_pipeline, cache)
    made = synthetic_data(cfg, data, images, labels, 0, device)
    assert not made.cached and len(cache_files(cache)) == 1
    assert not list(cache.glob(".*.tmp"))  # written atomically: no temporary left behind

    def must_not_generate(*args: object, **kwargs: object) -> None:
        raise AssertionError("generated although the cache holds the images")

    real_generate = synthetic_module.generate_client
    monkeypatch.setattr(synthetic_module, "generate_client", must_not_generate)
    synthetic_module._LOADED.clear()
    again = synthetic_data(cfg, data, images, labels, 0, device)  # a new process: from the disk cache
    assert again.cached and torch.equal(again.images, made.images) and torch.equal(again.labels, made.labels)
    monkeypatch.setattr(synthetic_module, "generate_client", real_generate)

    # everything that determines the images invalidates: generation settings, seed, client, deficits, weights
    changed = [regl_config(tiny_pipeline, cache, **{"regl-steps": STEPS + 1}),
               regl_config(tiny_pipeline, cache, **{"regl-guidance": 3.0}),
               regl_config(tiny_pipeline, cache, **{"regl-prompt": "a {class}"}),
               regl_config(tiny_pipeline, cache, seed=7),
               regl_config(tiny_pipeline, cache, **{"regl-target": "fixed", "regl-synthetic-per-class": 6})]
    for n, other in enumerate(changed, start=2):
        assert not synthetic_data(other, data, images, labels, 0, device).cached
        assert len(cache_files(cache)) == n
    assert not synthetic_data(cfg, data, images, labels, 1, device).cached  # another client
    # what does not determine the images keeps the key: the batch size, the method, the learning rate
    same = regl_config(tiny_pipeline, cache, **{"regl-batch-size": 3, "method": "fedavg", "local-lr": 0.5})
    synthetic_module._LOADED.clear()
    assert synthetic_data(same, data, images, labels, 0, device).cached
    # new weights in the same folder (a file rewritten) invalidate too
    config_file = tiny_pipeline / "scheduler" / "scheduler_config.json"
    stat = config_file.stat()
    os.utime(config_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    try:
        synthetic_module._LOADED.clear()
        assert not synthetic_data(cfg, data, images, labels, 0, device).cached
    finally:
        os.utime(config_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))


# ---------------------------------------------------------------- LoRA


@pytest.mark.parametrize("device", DEVICES)
def test_lora_trains_only_the_adapter(tiny_pipeline: Path, tmp_path: Path, device: torch.device) -> None:
    from fedlt_app.generative.lora import adapt, adapter_state
    from fedlt_app.generative.pipeline import load_pipeline

    pipe = load_pipeline(str(tiny_pipeline), device)
    before = {name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()}
              for name in ("unet", "vae", "text_encoder")}
    data, images, labels = client_data("fmnist", (1, 28, 28), [3] * 10)
    prompts = class_prompts("A photo of {class}", "fmnist", 10)
    losses = adapt(pipe, images, labels, prompts, rank=4, steps=3, lr=1e-2, batch_size=2, resolution=32,
                   generator=torch.Generator().manual_seed(0))
    assert len(losses) == 3 and all(np.isfinite(losses))
    adapter = adapter_state(pipe.unet)
    assert adapter and all("lora_" in k for k in adapter)
    assert 10_000 < sum(v.numel() for v in adapter.values()) < 20_000  # ~15k on the tiny UNet (notes)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero: it learned
    unet_after = pipe.unet.state_dict()
    base = {k.replace(".base_layer", ""): v for k, v in unet_after.items() if "lora_" not in k}
    assert base.keys() == before["unet"].keys()
    assert all(torch.equal(v, before["unet"][k]) for k, v in base.items())  # the base UNet is bit-identical
    for name in ("vae", "text_encoder"):
        assert all(torch.equal(v, before[name][k]) for k, v in getattr(pipe, name).state_dict().items())
    assert not any(p.requires_grad for p in pipe.unet.parameters())


@pytest.mark.parametrize("device", DEVICES)
def test_lora_images_are_cached_under_the_clients_data(tiny_pipeline: Path, tmp_path: Path,
                                                       device: torch.device) -> None:
    data, images, labels = client_data("fmnist", (1, 28, 28), [2, 0, 2, 2, 2, 2, 2, 2, 2, 2])
    lora = {"regl-lora": True, "regl-lora-steps": 2, "regl-lora-lr": 0.05, "regl-lora-batch-size": 2}
    plain = synthetic_data(regl_config(tiny_pipeline, tmp_path), data, images, labels, 0, device)
    tuned = synthetic_data(regl_config(tiny_pipeline, tmp_path, **lora), data, images, labels, 0, device)
    assert not tuned.cached and tuned.labels.tolist() == plain.labels.tolist()
    assert not torch.equal(tuned.images, plain.images)  # the adapter changed what was generated
    other_images = images.clone()
    other_images[0] ^= 1  # one pixel's worth of other real data: another adapter, another key
    assert not synthetic_data(regl_config(tiny_pipeline, tmp_path, **lora), data, other_images, labels, 0,
                              device).cached
    assert len(cache_files(tmp_path)) == 3


# ---------------------------------------------------------------- the ClientApp


@pytest.mark.parametrize("count", ["all", "real"])
def test_the_clientapp_trains_on_real_and_synthetic_and_sends_only_the_model(
        tiny_pipeline: Path, tmp_path: Path, count: str) -> None:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

    from fedlt_app import client_app
    from fedlt_app.configured_data import federated_data
    from fedlt_app.task import initial_model

    run_config = {"method": "fedavg", "samples-per-class": 6, "imbalance-ratio": 2.0, "device": "cpu",
                  "precision": "fp32", "synthetic-data": "regl", "regl-generator": str(tiny_pipeline),
                  "regl-cache-dir": str(tmp_path), "regl-steps": STEPS, "regl-weight-count": count}
    cfg = resolve(run_config)
    data = federated_data(cfg, 2)
    real = data.client_data(1)[1]
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 2},
                      state=RecordDict(), run_config=dict(run_config))

    def message(kind: str, content: RecordDict) -> Message:
        metadata = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                            group_id="1", created_at=time.time(), ttl=3600.0, message_type=kind)
        return Message(content=content, metadata=metadata)

    phase = client_app.regl_generate(message("query.regl_generate", RecordDict()), context)
    assert list(phase.content.keys()) == ["regl"]  # counts and seconds, nothing else
    generated = phase.content["regl"]
    expected = int(shortfall(class_counts(real, 10), "balanced-max").sum())
    assert generated["num-real"] == len(real) and generated["num-synthetic"] == expected > 0
    start = initial_model(cfg, data).travelling_state()
    reply = client_app.train(message("train", RecordDict({"arrays": ArrayRecord(start),
                                                          "config": ConfigRecord({"server-round": 1})})), context)
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    assert set(reply.content["arrays"].keys()) == set(start)  # the model, nothing of the images
    metrics = reply.content["metrics"]
    assert metrics["num-synthetic"] == expected
    assert metrics["num-examples"] == (len(real) + expected if count == "all" else len(real))


# ---------------------------------------------------------------- end to end through the real apps (in process)


def test_regl_end_to_end_joins_synthetic_images_to_the_clients_data(tiny_pipeline: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    code = run_in_process(tmp_path, monkeypatch,
                          f"method='fedavg' synthetic-data='regl' regl-generator='{tiny_pipeline}' "
                          f"regl-cache-dir='{cache}' "
                          f"regl-steps={STEPS} num-server-rounds=2 samples-per-class=12 imbalance-ratio=4.0 "
                          f"dirichlet-alpha=0.3 output-dir='{tmp_path / 'out'}' run-name='regl'", num_clients=2)
    assert code == 0
    run = tmp_path / "out" / "regl"
    config = json.loads((run / "config.json").read_text())
    generated = config["synthetic"]
    assert generated["partition_ids"] == [0, 1] and generated["cached"] == [False, False]
    for k, counts in enumerate(config["client_class_counts"]):  # balanced-max: every class at the client's max
        assert generated["num_real"][k] == sum(counts)
        assert generated["num_synthetic"][k] == len(counts) * max(counts) - sum(counts) > 0
    assert len(cache_files(cache)) == 2  # one per client, on the client's side
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["failed_clients"] == [] and np.isfinite(r["train_loss"]) for r in rows)
    # only the model travels: the same bytes each way, as a run without synthetic data
    assert all(r["bytes_up"] == r["bytes_down"] for r in rows)
