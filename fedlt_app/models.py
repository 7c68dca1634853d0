"""Networks with an explicit encoder/classifier split.

Decoupled training needs to reach the features h and the linear classifier W
separately (prototypes are gradients w.r.t. W; the balanced loss trains W on a
frozen h), so every model here is ``classifier(encoder(x))`` and nothing else.
The architectures are the ones behind the paper's tables (their Table 5
parameter counts agree with them), see ../shared/PAPER.md.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

MODELS = ("cnn", "cnn-mcmahan", "resnet56", "cnn4conv")


class EncoderClassifier(nn.Module):
    """``logits = classifier(encoder(x))`` with the feature width on record."""

    def __init__(self, encoder: nn.Module, feature_dim: int, num_classes: int,
                 classifier: nn.Module | None = None) -> None:
        """``classifier`` defaults to a linear layer W; CLIP's heads compute theirs from text."""
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(feature_dim, num_classes) if classifier is None else classifier
        self.feature_dim = feature_dim
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        """Logits, always float32: under autocast every loss and softmax downstream stays full precision."""
        return self.classifier(self.encoder(x)).float()

    def travelling_state(self) -> dict[str, Tensor]:
        """The state that goes over the wire each round (and into checkpoints): here all of it.

        A model with a frozen part every node already holds (CLIP) names only
        its trainable part, so the apps and the strategy never special-case it.
        """
        return self.state_dict()

    def load_travelling_state(self, state: Mapping[str, Tensor]) -> None:
        """Inverse of :meth:`travelling_state` (strict: a missing or extra key is an error)."""
        self.load_state_dict(state)


def _reddi_cnn_encoder(in_channels: int, image_size: int) -> tuple[nn.Module, int]:
    """The CNN of Reddi et al. (2021) used by the authors' code for (FE)MNIST.

    h is taken after the second dropout, as in the authors' two-head model, so
    the classifier and the supplementary classifier see the same features.
    """
    side = (image_size - 4) // 2
    encoder = nn.Sequential(
        nn.Conv2d(in_channels, 32, kernel_size=3),
        nn.ReLU(),
        nn.Conv2d(32, 64, kernel_size=3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout(0.25),
        nn.Flatten(),
        nn.Linear(64 * side * side, 128),
        nn.ReLU(),
        nn.Dropout(0.5),
    )
    return encoder, 128


def _mcmahan_cnn_encoder(in_channels: int, image_size: int) -> tuple[nn.Module, int]:
    """The 5x5 CNN of McMahan et al. (2017): what the paper's text names."""
    side = image_size // 4
    encoder = nn.Sequential(
        nn.Conv2d(in_channels, 32, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * side * side, 512),
        nn.ReLU(),
    )
    return encoder, 512


def _cnn4conv_encoder(in_channels: int, image_size: int) -> tuple[nn.Module, int]:
    """FairFAL's ``cnn4conv``: four [3x3 conv 64 (pad 1) -> BN -> ReLU -> 2x2 max-pool] blocks.

    h is the flattened last block: 64·2·2 = 256 for 32x32 inputs, 64·1·1 = 64
    for 28x28 (28 -> 14 -> 7 -> 3 -> 1); ~116k parameters for CIFAR-10.
    """
    layers: list[nn.Module] = []
    channels, side = in_channels, image_size
    for _ in range(4):
        layers += [nn.Conv2d(channels, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        channels, side = 64, side // 2
    layers.append(nn.Flatten())
    return nn.Sequential(*layers), 64 * side * side


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 residual block with expansion 4."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(in_planes, planes, 1, bias=False),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, out_planes, 1, bias=False),
            nn.BatchNorm2d(out_planes),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


def _resnet56_encoder(in_channels: int, blocks_per_stage: int = 6) -> tuple[nn.Module, int]:
    """FedML's bottleneck ResNet-56 (the authors' CIFAR model), 256-d features."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
    ]
    in_planes = 16
    for planes, stride in ((16, 1), (32, 2), (64, 2)):
        for block in range(blocks_per_stage):
            layers.append(Bottleneck(in_planes, planes, stride if block == 0 else 1))
            in_planes = planes * Bottleneck.expansion
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    encoder = nn.Sequential(*layers)
    for module in encoder.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return encoder, in_planes


def build_model(name: str, num_classes: int, in_channels: int, image_size: int) -> EncoderClassifier:
    """Build a model by its run-config name (`model`)."""
    if name == "cnn":
        encoder, dim = _reddi_cnn_encoder(in_channels, image_size)
    elif name == "cnn-mcmahan":
        encoder, dim = _mcmahan_cnn_encoder(in_channels, image_size)
    elif name == "resnet56":
        encoder, dim = _resnet56_encoder(in_channels)
    elif name == "cnn4conv":
        encoder, dim = _cnn4conv_encoder(in_channels, image_size)
        model = EncoderClassifier(encoder, dim, num_classes)
        nn.init.zeros_(model.classifier.bias)  # as FairFAL's code
        return model
    else:
        raise ValueError(f"model: unknown model {name!r}; allowed: {', '.join(MODELS)}")
    return EncoderClassifier(encoder, dim, num_classes)


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters (what the paper's Table 5 counts)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
