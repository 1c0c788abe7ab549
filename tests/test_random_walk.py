"""random_walk against a dense T = D^-1 W built with explicit loops, plus the walk's invariants."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from psa_ray.ops.affinity import pair_offsets
from psa_ray.ops.random_walk import chebyshev_coefficients, random_walk, random_walk_many, transition_matrix


def dense_affinity_matrix(affinities: torch.Tensor, beta: float) -> torch.Tensor:
    """W [hw, hw] float64 of one image from affinities [K,h,w], pixel index y * w + x."""
    num_pairs, height, width = affinities.shape
    offsets = pair_offsets({4: 2, 12: 3, 34: 5}[num_pairs])
    weights = torch.eye(height * width, dtype=torch.float64)
    for k, (dy, dx) in enumerate(offsets):
        for y in range(height):
            for x in range(width):
                if 0 <= y + dy < height and 0 <= x + dx < width:
                    i, j = y * width + x, (y + dy) * width + (x + dx)
                    weights[i, j] = weights[j, i] = float(affinities[k, y, x]) ** beta
    return weights


def dense_walk(affinities: torch.Tensor, cams: torch.Tensor, beta: float, t: int) -> torch.Tensor:
    """T^t vec(M) with T = D^-1 W as dense matrices, per image; [B,C,h,w] float64."""
    batch, channels, height, width = cams.shape
    out = torch.empty(cams.shape, dtype=torch.float64)
    for b in range(batch):
        weights = dense_affinity_matrix(affinities[b], beta)
        transition = weights / weights.sum(dim=1, keepdim=True)
        power = torch.linalg.matrix_power(transition, t)
        out[b] = (power @ cams[b].double().reshape(channels, -1).T).T.reshape(channels, height, width)
    return out


def random_inputs(batch: int, radius: int, channels: int, height: int, width: int,
                  dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # Affinities outside the image are random too: the walk must ignore them.
    affinities = torch.rand(batch, len(pair_offsets(radius)), height, width, generator=generator, dtype=dtype)
    cams = torch.rand(batch, channels, height, width, generator=generator, dtype=dtype)
    return affinities, cams


@pytest.mark.parametrize("height,width", [(5, 7), (6, 4)])
@pytest.mark.parametrize("beta", [1.0, 4.0, 8.0])
@pytest.mark.parametrize("t", [1, 3, 16, 256])
def test_matches_dense_transition(height: int, width: int, beta: float, t: int) -> None:
    affinities, cams = random_inputs(2, 3, 4, height, width)
    walked = random_walk(affinities, cams, beta=beta, t=t)
    assert walked.shape == cams.shape and walked.dtype == torch.float64
    expected = dense_walk(affinities, cams, beta, t)
    torch.testing.assert_close(walked, expected, rtol=1e-5, atol=1e-9)


def test_radius_five_on_twelve_by_ten() -> None:
    affinities, cams = random_inputs(1, 5, 3, 12, 10, seed=1)
    for t in (2, 256):
        torch.testing.assert_close(random_walk(affinities, cams, 8.0, t), dense_walk(affinities, cams, 8.0, t),
                                   rtol=1e-5, atol=1e-9)


def test_grid_smaller_than_the_radius() -> None:
    affinities, cams = random_inputs(2, 5, 2, 3, 2, seed=6)
    torch.testing.assert_close(random_walk(affinities, cams, 8.0, 256), dense_walk(affinities, cams, 8.0, 256),
                               rtol=1e-5, atol=1e-9)


def test_float32_keeps_dtype_and_matches_float64() -> None:
    affinities, cams = random_inputs(2, 5, 3, 12, 10, dtype=torch.float32, seed=2)
    walked = random_walk(affinities, cams, 8.0, 256)
    assert walked.dtype == torch.float32
    torch.testing.assert_close(walked.double(), dense_walk(affinities, cams, 8.0, 256), rtol=1e-4, atol=1e-6)


def test_output_is_a_weighted_average() -> None:
    affinities, cams = random_inputs(2, 3, 5, 9, 11, seed=3)
    for t in (1, 5, 256):
        walked = random_walk(affinities, cams, 8.0, t)
        low = cams.amin(dim=(2, 3), keepdim=True)
        high = cams.amax(dim=(2, 3), keepdim=True)
        assert (walked >= low - 1e-12).all() and (walked <= high + 1e-12).all()
    torch.testing.assert_close(random_walk(affinities, cams, 8.0, 0), cams, rtol=0.0, atol=0.0)
    constant = torch.full((2, 2, 9, 11), 0.37, dtype=torch.float64)
    torch.testing.assert_close(random_walk(affinities, constant, 8.0, 256), constant, rtol=1e-12, atol=1e-12)


def test_degree_weighted_mass_is_preserved() -> None:
    affinities, cams = random_inputs(1, 3, 2, 6, 8, seed=4)
    degree = dense_affinity_matrix(affinities[0], 4.0).sum(dim=1).reshape(6, 8)
    for t in (1, 7, 256):
        walked = random_walk(affinities, cams, 4.0, t)
        # sum_j d_j (T m)_j = sum_j sum_i W_ji m_i = sum_i d_i m_i
        torch.testing.assert_close((degree * walked[0]).sum(dim=(1, 2)), (degree * cams[0]).sum(dim=(1, 2)),
                                   rtol=1e-10, atol=0.0)


def test_disconnected_regions_do_not_mix() -> None:
    """Zero affinity across a vertical cut: each side averages only its own scores."""
    height, width, cut = 6, 8, 3
    affinities = torch.ones(1, 12, height, width, dtype=torch.float64)
    for k, (_dy, dx) in enumerate(pair_offsets(3)):
        for x in range(width):
            if (x < cut) != (x + dx < cut):
                affinities[0, k, :, x] = 0.0
    cams = torch.zeros(1, 1, height, width, dtype=torch.float64)
    cams[0, 0, :, :cut] = 1.0
    walked = random_walk(affinities, cams, 8.0, 256)
    torch.testing.assert_close(walked, cams, rtol=0.0, atol=1e-12)


def test_chebyshev_truncation_is_within_tolerance() -> None:
    x = np.linspace(-1.0, 1.0, 20001)
    for t, tolerance in [(64, 1e-8), (256, 1e-12), (257, 1e-7), (1000, 1e-10)]:
        coefficients = chebyshev_coefficients(t, tolerance)
        assert coefficients is not None and len(coefficients) - 1 < t
        error = np.abs(np.polynomial.chebyshev.chebval(x, coefficients) - x**t).max()
        assert error <= tolerance + 1e-13  # + rounding of the evaluation
    assert chebyshev_coefficients(3, 1e-7) is None  # short walks are exact powers


def test_large_grid_stays_sparse() -> None:
    """A 128 x 128 grid: T holds the pairs and the diagonal only (its time: bench/random_walk.py)."""
    affinities, cams = random_inputs(1, 5, 3, 128, 128, dtype=torch.float32, seed=5)
    transition = transition_matrix(affinities, 8.0, torch.float32)
    assert transition.layout == torch.sparse_csr
    assert transition.values().numel() <= (2 * 34 + 1) * 128 * 128  # no (hw) x (hw) storage
    walked = random_walk(affinities, cams, 8.0, 256)
    assert walked.shape == cams.shape and torch.isfinite(walked).all()


def test_images_of_different_sizes_walk_together_as_they_walk_alone() -> None:
    """One block-diagonal walk over three grids and class counts (two images share one): each
    image gets its own walk (the dense one), with nothing leaking between images."""
    shapes = [(2, 7, 5), (4, 3, 9), (2, 7, 5), (1, 6, 6)]  # (channels, h, w)
    affinities, cams = [], []
    for n, (channels, height, width) in enumerate(shapes):
        a, m = random_inputs(1, 3, channels, height, width, seed=10 + n)
        affinities.append(a[0])
        cams.append(m[0])
    for t in (3, 256):
        walked = random_walk_many(affinities, cams, 8.0, t)
        for a, m, w in zip(affinities, cams, walked, strict=True):
            assert w.shape == m.shape
            torch.testing.assert_close(w[None], dense_walk(a[None], m[None], 8.0, t), rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(w[None], random_walk(a[None], m[None], 8.0, t), rtol=1e-9, atol=1e-12)


def test_rejects_bad_inputs() -> None:
    affinities, cams = random_inputs(1, 3, 2, 5, 6)
    with pytest.raises(ValueError, match="share"):
        random_walk(affinities, cams[..., :5])
    with pytest.raises(ValueError, match="share"):
        random_walk(affinities, torch.cat([cams, cams]))
    with pytest.raises(ValueError, match="no pair radius"):
        random_walk(affinities[:, :10], cams)
    with pytest.raises(ValueError, match=r"\[B,K,h,w\]"):
        random_walk(affinities[0], cams)
    with pytest.raises(ValueError, match="floating"):
        random_walk(affinities, cams.long())
    with pytest.raises(ValueError, match="beta"):
        random_walk(affinities, cams, beta=0.0)
    with pytest.raises(ValueError, match="t must"):
        random_walk(affinities, cams, t=-1)
    with pytest.raises(ValueError, match="share the"):
        random_walk_many([affinities[0], affinities[0]], [cams[0], cams[0, :, :4]])
    with pytest.raises(ValueError, match="at least one"):
        random_walk_many([], [])
    with pytest.raises(ValueError, match="one dtype"):
        random_walk_many([affinities[0], affinities[0]], [cams[0], cams[0].float()])
