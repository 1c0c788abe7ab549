"""Multi-scale + flip CAMs with a fake network, normalisation, background map and labels."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from psa_ray.ops.cam import class_activation_maps, normalize_cams, with_background


class FakeCamNet(nn.Module):
    """cams(x) = ReLU(gain * avg_pool8(x[:, :2] - 0.5)): two classes from channels 0 and 1."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(2.0))
        self.batch_sizes: list[int] = []

    def cams(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        return F.relu(self.gain * F.avg_pool2d(x[:, :2] - 0.5, 8))


def test_sum_over_scales_and_flips_matches_manual_computation() -> None:
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 48)
    scales = (0.5, 1.0, 1.5)
    model = FakeCamNet().eval()
    cams = class_activation_maps(model, images, scales, flip=True)
    assert cams.shape == (2, 2, 32, 48) and not cams.requires_grad
    assert model.batch_sizes == [4, 4, 4]  # image and mirror image in one batch per scale
    expected = torch.zeros(2, 2, 32, 48)
    with torch.no_grad():
        for scale in scales:
            scaled = F.interpolate(images, size=(round(32 * scale), round(48 * scale)), mode="bilinear",
                                   align_corners=False)
            for mirrored in (False, True):
                x = scaled.flip(-1) if mirrored else scaled
                cam = F.relu(2.0 * F.avg_pool2d(x[:, :2] - 0.5, 8))
                cam = cam.flip(-1) if mirrored else cam
                expected += F.interpolate(cam, size=(32, 48), mode="bilinear", align_corners=False)
    torch.testing.assert_close(cams, expected, rtol=1e-5, atol=1e-6)


def test_constant_image_gives_scales_times_flips_times_value() -> None:
    images = torch.full((1, 3, 24, 40), 0.5)
    images[:, 0] = 0.8   # class 0: relu(2 * 0.3) = 0.6 everywhere; class 1: 0
    scales = (0.5, 1.0, 2.0)
    cams = class_activation_maps(FakeCamNet().eval(), images, scales, flip=True)
    torch.testing.assert_close(cams[0, 0], torch.full((24, 40), 0.6 * 3 * 2))
    assert cams[0, 1].abs().max() == 0
    single = class_activation_maps(FakeCamNet().eval(), images, (1.0,), flip=False)
    torch.testing.assert_close(single[0, 0], torch.full((24, 40), 0.6))


def test_min_side_upscales_a_small_image_before_the_scales() -> None:
    sizes: list[tuple[int, ...]] = []

    class SizeRecorder(FakeCamNet):
        def cams(self, x: torch.Tensor) -> torch.Tensor:
            sizes.append(tuple(x.shape[-2:]))
            return super().cams(x)

    images = torch.rand(1, 3, 24, 40)
    cams = class_activation_maps(SizeRecorder().eval(), images, (1.0, 0.5), flip=False, min_side=48)
    assert sizes == [(48, 80), (24, 40)] and cams.shape == (1, 2, 24, 40)
    sizes.clear()
    class_activation_maps(SizeRecorder().eval(), images, (1.0,), flip=False, min_side=16)  # large enough already
    assert sizes == [(24, 40)]


def test_flip_equivariance() -> None:
    torch.manual_seed(1)
    half = torch.rand(1, 3, 32, 24)
    symmetric = torch.cat([half, half.flip(-1)], dim=-1)
    model = FakeCamNet().eval()
    cams = class_activation_maps(model, symmetric, (0.75, 1.0, 1.25), flip=True)
    torch.testing.assert_close(cams, cams.flip(-1), rtol=1e-5, atol=1e-6)
    images = torch.rand(1, 3, 32, 48)
    torch.testing.assert_close(class_activation_maps(model, images.flip(-1), (1.0, 1.5), flip=True),
                               class_activation_maps(model, images, (1.0, 1.5), flip=True).flip(-1),
                               rtol=1e-5, atol=1e-6)


def test_normalize_cams() -> None:
    torch.manual_seed(2)
    cams = torch.rand(2, 3, 5, 6) * 7.0
    tags = torch.tensor([[1, 0, 1], [0, 1, 0]])
    normalized = normalize_cams(cams, tags)
    assert normalized.shape == cams.shape
    for b in range(2):
        for c in range(3):
            if tags[b, c]:
                peak = float(cams[b, c].max())
                torch.testing.assert_close(normalized[b, c], cams[b, c] / (peak + 1e-5))
                assert float(normalized[b, c].max()) == pytest.approx(1.0, abs=1e-5)
            else:
                assert torch.equal(normalized[b, c], torch.zeros(5, 6))
    assert normalized.min() >= 0 and normalized.max() <= 1


def test_with_background_formula() -> None:
    cams = torch.tensor([[[[0.2, 0.9, 0.0]], [[0.5, 0.1, 0.0]]]])  # [1,2,1,3]
    scores = with_background(cams, alpha=4.0)
    assert scores.shape == (1, 3, 1, 3)
    torch.testing.assert_close(scores[0, 0, 0], torch.tensor([0.5**4, 0.1**4, 1.0]))
    torch.testing.assert_close(scores[:, 1:], cams)
    empty = with_background(torch.zeros(1, 0, 2, 2), alpha=16.0)
    torch.testing.assert_close(empty, torch.ones(1, 1, 2, 2))


def test_shape_errors() -> None:
    with pytest.raises(ValueError):
        class_activation_maps(FakeCamNet(), torch.rand(3, 16, 16), (1.0,), flip=False)
    with pytest.raises(ValueError):
        normalize_cams(torch.rand(1, 3, 4, 4), torch.ones(1, 2))
    with pytest.raises(ValueError):
        with_background(torch.rand(3, 4, 4), 4.0)
