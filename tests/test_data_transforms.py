"""Batched transforms match the per-sample torchvision semantics they replace."""

from __future__ import annotations

import pytest
import torch

from fedlt_app.data import augment, to_float
from fedlt_app.data.transforms import CROP_FLIP, CROP_PADDING, CUTOUT_SIZE, GRAYSCALE_CROP_PADDING

CIFAR10_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
CIFAR10_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_batch(n: int, channels: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=_gen(seed))


def test_to_float_mnist_is_plain_scaling() -> None:
    images = _random_batch(4, channels=1, size=28)
    out = to_float(images, "fmnist")
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert torch.equal(out, images.float() / 255)
    assert torch.equal(augment(images, "mnist", _gen(0)), out)


@pytest.mark.parametrize(
    ("dataset", "mean", "std"),
    [
        ("cifar10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        ("cifar100", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    ],
)
def test_to_float_cifar_normalises(dataset: str, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    images = _random_batch(3)
    expected = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(to_float(images, dataset), expected, atol=1e-6)
    # A pixel equal to the mean maps to zero.
    grey = torch.round(torch.tensor(mean) * 255).to(torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2).contiguous()
    assert to_float(grey, dataset).abs().max() < 0.01


def test_augment_shape_dtype_and_statistics() -> None:
    # Pixels 1..255, so that zero padding (pixel 0) is recognisable after un-normalising.
    images = torch.randint(1, 256, (512, 3, 32, 32), dtype=torch.uint8, generator=_gen(0))
    out = augment(images, "cifar10", _gen(0))
    assert out.shape == images.shape and out.dtype == torch.float32
    cut = (out == 0).all(dim=1, keepdim=True).expand_as(out)
    pixels = (out * CIFAR10_STD + CIFAR10_MEAN) * 255
    # Outside the hole every value is a pixel value or the zero padding.
    assert torch.allclose(pixels[~cut], pixels[~cut].round(), atol=1e-3)
    assert pixels[~cut].min() > -1e-3 and pixels[~cut].max() < 255 + 1e-3
    padding = (pixels.round() == 0) & ~cut
    # Expected areas: a crop offset uniform in 0..8 pads |o - 4| rows (mean 20/9),
    # and a 16-wide hole centred uniformly in 0..31 is clipped at the borders.
    pad_rows = 20 / 9 / 32
    expected_padding = (1 - (1 - pad_rows) ** 2) * (1 - expected_cut_fraction())
    assert abs(cut.float().mean().item() - expected_cut_fraction()) < 0.02
    assert abs(padding.float().mean().item() - expected_padding) < 0.02
    # Image pixels are normalised like the evaluation transform: means agree.
    kept = ~cut & ~padding
    plain = to_float(images, "cifar10")
    for c in range(3):
        assert abs(out[:, c][kept[:, c]].mean() - plain[:, c].mean()) < 0.02


def expected_cut_fraction() -> float:
    lengths = [min(c + 8, 32) - max(c - 8, 0) for c in range(32)]
    return (sum(lengths) / 32 / 32) ** 2


def test_augment_is_deterministic_with_a_seeded_generator() -> None:
    images = _random_batch(16)
    assert torch.equal(augment(images, "cifar10", _gen(5)), augment(images, "cifar10", _gen(5)))
    assert not torch.equal(augment(images, "cifar10", _gen(5)), augment(images, "cifar10", _gen(6)))
    # generator=None uses torch's global RNG and still works.
    assert augment(images, "cifar100", None).shape == images.shape


def _expected_crop(image: torch.Tensor, oy: int, ox: int, flip: bool) -> torch.Tensor:
    padded = torch.nn.functional.pad(image, (CROP_PADDING,) * 4)
    crop = padded[:, oy : oy + 32, ox : ox + 32]
    return crop.flip(-1) if flip else crop


def test_crop_and_flip_match_per_sample_reference() -> None:
    """Replay the generator's draws and compare to a crop/flip done sample by sample."""
    images = _random_batch(64, seed=3)
    out = augment(images, "cifar10", _gen(11))
    replay = _gen(11)
    n = images.shape[0]
    oy = torch.randint(0, 2 * CROP_PADDING + 1, (n,), generator=replay)
    ox = torch.randint(0, 2 * CROP_PADDING + 1, (n,), generator=replay)
    flip = torch.rand(n, generator=replay) < 0.5
    cy = torch.randint(0, 32, (n,), generator=replay)
    cx = torch.randint(0, 32, (n,), generator=replay)
    assert flip.any() and (~flip).any() and (oy != CROP_PADDING).any()
    for i in range(n):
        expected = to_float(_expected_crop(images[i], int(oy[i]), int(ox[i]), bool(flip[i]))[None], "cifar10")[0]
        y0, y1 = max(int(cy[i]) - 8, 0), min(int(cy[i]) + 8, 32)
        x0, x1 = max(int(cx[i]) - 8, 0), min(int(cx[i]) + 8, 32)
        expected[:, y0:y1, x0:x1] = 0
        assert torch.allclose(out[i], expected, atol=1e-6), i


def test_flip_on_constructed_image() -> None:
    """A left-to-right ramp must come back either as is or mirrored, shifted by the crop."""
    ramp = (torch.arange(32) * 8 + 4).to(torch.uint8).view(1, 1, 1, 32).expand(200, 3, 32, 32).contiguous()
    out = augment(ramp, "cifar10", _gen(1))
    red = ((out * CIFAR10_STD + CIFAR10_MEAN) * 255).round()[:, 0]  # (N, H, W)
    increasing = decreasing = 0
    for image, normalised in zip(red, out[:, 0], strict=True):
        # Rows and columns 4..27 are image pixels whatever the crop; skip rows the hole touches.
        row = next(image[r, 4:28] for r in range(4, 28) if (normalised[r, 4:28] != 0).all())
        steps = torch.diff(row)
        increasing += bool((steps == 8).all())
        decreasing += bool((steps == -8).all())
    assert increasing + decreasing == 200
    assert 60 < increasing < 140


def test_cutout_zeroes_one_clipped_square() -> None:
    images = torch.full((500, 3, 32, 32), 200, dtype=torch.uint8)
    out = augment(images, "cifar10", _gen(2))
    # Padding pixels are (0 - mean)/std < 0; image pixels are > 0; the hole is exactly 0.
    hole = (out == 0).all(dim=1)  # (N, H, W)
    for mask in hole:
        rows = mask.any(dim=1).nonzero().flatten()
        cols = mask.any(dim=0).nonzero().flatten()
        assert rows.numel() > 0
        height, width = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        # One solid rectangle, 16 wide unless clipped by the border.
        assert int(mask.sum()) == height * width
        assert height == CUTOUT_SIZE or rows[0] == 0 or rows[-1] == 31
        assert width == CUTOUT_SIZE or cols[0] == 0 or cols[-1] == 31
        assert height <= CUTOUT_SIZE and width <= CUTOUT_SIZE
    full = [(int(m.sum()) == CUTOUT_SIZE**2) for m in hole]
    assert 0 < sum(full) < len(full)  # both unclipped and clipped squares occur


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        to_float(torch.zeros(2, 3, 32, 32), "cifar10")
    with pytest.raises(ValueError, match="dataset"):
        augment(_random_batch(2), "svhn", None)


def test_crop_flip_on_fashion_mnist_matches_per_sample_reference() -> None:
    """augment='crop-flip': RandomCrop(28, padding 2) + flip, replayed sample by sample; no Cutout, no Normalize."""
    images = _random_batch(64, channels=1, size=28, seed=4)
    out = augment(images, "fmnist", _gen(12), CROP_FLIP)
    replay = _gen(12)
    n, pad = images.shape[0], GRAYSCALE_CROP_PADDING
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=replay)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=replay)
    flip = torch.rand(n, generator=replay) < 0.5
    assert flip.any() and (~flip).any() and (oy != pad).any()
    for i in range(n):
        padded = torch.nn.functional.pad(images[i], (pad,) * 4)
        crop = padded[:, int(oy[i]) : int(oy[i]) + 28, int(ox[i]) : int(ox[i]) + 28]
        expected = (crop.flip(-1) if flip[i] else crop).float() / 255.0
        assert torch.equal(out[i], expected), i
    # The authors' pipeline (the default) leaves Fashion-MNIST as ToTensor and draws nothing.
    generator = _gen(12)
    assert torch.equal(augment(images, "fmnist", generator), to_float(images, "fmnist"))
    assert torch.equal(torch.rand(3, generator=generator), torch.rand(3, generator=_gen(12)))


def test_crop_flip_keeps_cifar_on_the_authors_pipeline_and_refuses_glyphs() -> None:
    images = _random_batch(8)
    assert torch.equal(augment(images, "cifar10", _gen(3), CROP_FLIP), augment(images, "cifar10", _gen(3)))
    for dataset in ("mnist", "femnist"):
        with pytest.raises(ValueError, match="augment: 'crop-flip'"):
            augment(_random_batch(2, channels=1, size=28), dataset, None, CROP_FLIP)
    with pytest.raises(ValueError, match="augment: unknown"):
        augment(images, "cifar10", None, "mixup")
