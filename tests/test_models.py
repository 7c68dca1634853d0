"""Models: the architectures behind the paper's tables, and Table 5's communication.

Expected parameter counts come from the paper's notes (../shared/PAPER.md,
"What the authors' released code does") and, for the communication table, from
the paper's Table 5; they are not read off this code.
"""

from __future__ import annotations

from unittest.mock import Mock

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvgM

from fedlt_app.config import resolve
from fedlt_app.data import FederatedData, ImageDataset
from fedlt_app.methods import ClientReport, get_method
from fedlt_app.methods.decoupled.redgrape import two_head_logits
from fedlt_app.models import MODELS, build_model, count_parameters
from fedlt_app.records import content_parameters, payload_to_record
from fedlt_app.strategy import METHOD_KEY, FedLTStrategy


def _linear(d: int, c: int) -> int:
    return d * c + c


# ---------------------------------------------------------------- architectures


@pytest.mark.parametrize(
    ("name", "classes", "channels", "size", "total", "encoder", "dim"),
    [
        ("cnn", 10, 1, 28, 1_199_882, 1_199_882 - _linear(128, 10), 128),
        ("cnn-mcmahan", 10, 1, 28, 1_663_370, 1_663_370 - _linear(512, 10), 512),
        ("resnet56", 10, 3, 32, 591_322, 588_752, 256),
        ("resnet56", 100, 3, 32, 614_452, 588_752, 256),
        # FairFAL's cnn4conv: conv 3->64 (1,792) + 3 x conv 64->64 (36,928) + 4 x BN (128) = 113,088
        ("cnn4conv", 10, 3, 32, 115_658, 113_088, 256),
        ("cnn4conv", 10, 1, 28, 112_586, 113_088 - 2 * 9 * 64, 64),
    ],
)
def test_parameter_counts_match_the_paper(name, classes, channels, size, total, encoder, dim) -> None:
    model = build_model(name, classes, channels, size)
    assert count_parameters(model) == total
    assert count_parameters(model.encoder) == encoder
    assert count_parameters(model.classifier) == _linear(dim, classes)
    assert model.feature_dim == dim
    assert model.num_classes == classes
    assert tuple(model.classifier.weight.shape) == (classes, dim)


def test_count_parameters_skips_frozen_parameters() -> None:
    model = build_model("cnn", 10, 1, 28)
    model.classifier.weight.requires_grad_(False)
    assert count_parameters(model) == 1_199_882 - 128 * 10


@pytest.mark.parametrize(
    ("name", "classes", "channels", "size"),
    [("cnn", 10, 1, 28), ("cnn-mcmahan", 10, 1, 28), ("resnet56", 10, 3, 32), ("resnet56", 100, 3, 32),
     ("cnn4conv", 10, 3, 32), ("cnn4conv", 10, 1, 28)],
)
def test_forward_shapes_and_encoder_classifier_split(name, classes, channels, size) -> None:
    torch.manual_seed(0)
    model = build_model(name, classes, channels, size).eval()
    x = torch.randn(3, channels, size, size)
    with torch.no_grad():
        features = model.encoder(x)
        logits = model(x)
        composed = model.classifier(features)
    assert features.shape == (3, model.feature_dim)
    assert logits.shape == (3, classes)
    assert torch.allclose(logits, composed, atol=1e-6)


def test_reddi_cnn_features_come_after_the_dropouts() -> None:
    """h is taken after dropout 0.5 (the authors' two-head model): random in train mode only."""
    torch.manual_seed(0)
    model = build_model("cnn", 10, 1, 28)
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        model.train()
        a, b = model.encoder(x), model.encoder(x)
        assert not torch.equal(a, b)
        assert (a == 0).float().mean() > 0.4  # ReLU zeros plus half the units dropped
        model.eval()
        assert torch.equal(model.encoder(x), model.encoder(x))
    dropouts = [m.p for m in model.encoder.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts == [0.25, 0.5]
    assert isinstance(list(model.encoder.children())[-1], torch.nn.Dropout)


def test_models_list_is_the_buildable_set() -> None:
    assert set(MODELS) == {"cnn", "cnn-mcmahan", "resnet56", "cnn4conv"}


def test_cnn4conv_blocks_and_zero_bias() -> None:
    model = build_model("cnn4conv", 10, 3, 32)
    kinds = [type(m).__name__ for m in model.encoder.children()]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"] * 4 + ["Flatten"]
    convs = [m for m in model.encoder.children() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.out_channels == 64 for c in convs)
    assert torch.equal(model.classifier.bias, torch.zeros(10))


def test_unknown_model_raises_value_error_naming_the_key() -> None:
    with pytest.raises(ValueError, match="model"):
        build_model("vgg16", 10, 3, 32)


# ---------------------------------------------------------------- RedGrape's Ŵ


def test_redgrape_model_has_a_supplementary_head_that_inference_ignores() -> None:
    torch.manual_seed(0)
    model = get_method("redgrape").extend_model(build_model("cnn", 10, 1, 28)).eval()
    assert isinstance(model.supplementary, torch.nn.Linear)
    assert tuple(model.supplementary.weight.shape) == (10, 128)
    assert tuple(model.supplementary.bias.shape) == (10,)
    assert count_parameters(model) == 1_199_882 + _linear(128, 10)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        before = model(x).clone()
        model.supplementary.weight.normal_(0.0, 10.0)
        model.supplementary.bias.fill_(5.0)
        after = model(x)
        # ... while Ŵ does matter to the training logits, so the change above was real.
        assert not torch.allclose(two_head_logits(model, x), after)
    assert torch.equal(before, after)


def test_fedavg_model_is_not_extended() -> None:
    model = get_method("fedavg").extend_model(build_model("cnn", 10, 1, 28))
    assert not hasattr(model, "supplementary")
    assert count_parameters(model) == 1_199_882


# ---------------------------------------------------------------- Table 5



SETTINGS = {
    "mnist": ("mnist", "cnn", 10, 1, 28),
    "cifar10": ("cifar10", "resnet56", 10, 3, 32),
    "cifar100": ("cifar100", "resnet56", 100, 3, 32),
}


def _federated_data(num_classes: int, channels: int, size: int) -> FederatedData:
    """A one-client federation holding one sample of every class (the server parts only read its shape)."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (num_classes, channels, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.arange(num_classes)
    dataset = ImageDataset(
        name="fmnist" if channels == 1 else "cifar10",
        num_classes=num_classes,
        train_images=images,
        train_labels=labels,
        test_images=images,
        test_labels=labels,
    )
    return FederatedData(
        dataset=dataset,
        train_indices=np.arange(num_classes),
        class_counts=(1,) * num_classes,
        client_indices=(np.arange(num_classes),),
    )


def _client_report(method_name: str, cfg, model, num_classes: int, channels: int, size: int) -> dict:
    """The client's method report on a local set holding every class (one sample each)."""
    client = get_method(method_name).client(cfg, num_classes, {})
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (num_classes, channels, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.arange(num_classes)
    client.begin(model, images, labels, generator)
    return client.report()


@pytest.mark.parametrize(
    ("setting", "method_name", "expected_millions"),
    [
        ("mnist", "fedavg", 2.400),
        ("mnist", "redgrape", 2.428),
        ("cifar10", "fedavg", 1.183),
        ("cifar10", "redgrape", 1.239),
        ("cifar100", "fedavg", 1.229),
        ("cifar100", "redgrape", 6.420),
    ],
)
def test_table5_parameters_per_client_per_round(task_identity, setting, method_name, expected_millions) -> None:
    dataset, model_name, classes, channels, size = SETTINGS[setting]
    cfg = resolve({"method": method_name, "dataset": dataset, "model": model_name})
    method = get_method(method_name)
    torch.manual_seed(0)
    model = method.extend_model(build_model(model_name, classes, channels, size))
    server = method.server(cfg, model, _federated_data(classes, channels, size))

    # Up: what client_app.train returns (arrays + metrics + the method's report).
    report = _client_report(method_name, cfg, model, classes, channels, size)
    up = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": classes, "train-loss": 1.0}),
        }
    )
    if report:
        assert sorted(report["proto-classes"].tolist()) == list(range(classes))
        up[METHOD_KEY] = payload_to_record(report)
    assert (METHOD_KEY in up) == (method_name == "redgrape")

    # Down: once the server has a prototype for every class, what configure_train sends.
    server.absorb(1, [ClientReport(0, classes, report)])
    strategy = FedLTStrategy(
        inner=FedAvgM(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1),
        server_method=server,
        global_model=model,
        node_of_partition={0: 101},
        clients_per_round=0,
        seed=0,
    )
    grid = Mock()
    grid.get_node_ids.return_value = [101]
    (down,) = strategy.configure_train(2, ArrayRecord(model.state_dict()), ConfigRecord(), grid)
    assert (METHOD_KEY in down.content) == (method_name == "redgrape")
    assert strategy.current.parameters_down == content_parameters(down.content)

    total = strategy.current.parameters_down + content_parameters(up)
    assert round(total / 1e6, 3) == pytest.approx(expected_millions, abs=1e-9)

    # The exact figure, from the architecture: model (+Ŵ) both ways, and for
    # RedGrape C prototypes of d·C + C values each way.
    d = model.feature_dim
    per_direction = count_parameters(model)
    if method_name == "redgrape":
        per_direction += classes * _linear(d, classes)
    assert total == 2 * per_direction


def test_content_parameters_skips_batchnorm_statistics_and_integer_arrays() -> None:
    model = build_model("resnet56", 10, 3, 32)
    content = RecordDict({"arrays": ArrayRecord(model.state_dict())})
    assert content_parameters(content) == 591_322
    assert len(model.state_dict()) > len(list(model.parameters()))  # buffers travel too
    with_ints = RecordDict(
        {"m": payload_to_record({"i": np.arange(5, dtype=np.int64), "b": np.ones(3, bool),
                                 "f": np.ones(7, np.float32)})}
    )
    assert content_parameters(with_ints) == 7
