"""Random walk over AffinityNet's affinities: vec(M*) = T^t vec(M), T = D^-1 W, W = A^beta.

W is symmetric with a unit diagonal: W_ij = W_ji = a_k^beta for each half-plane pair (i, i + o_k)
of `pair_offsets(radius)`, zero elsewhere; D holds W's row sums. One step replaces each pixel's
scores by the W-weighted average over its neighbourhood (itself and its 2K partners).

T is kept as a sparse (CSR) stencil with at most 2K + 1 entries per pixel, never as a dense
(hw) x (hw) matrix, so memory and time are linear in h * w. T^t is applied as a Chebyshev
expansion of x^t truncated where the dropped terms are below the dtype's precision: T is similar
to a symmetric matrix with eigenvalues in [-1, 1], where x^t is within eps of a polynomial of
degree ~ sqrt(t) (about 100 instead of 256 products for t = 256); for small t the product is
applied t times exactly.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from psa_ray.ops.affinity import pair_offsets, pair_slices
from psa_ray.ops.forward import map_same_shape, same_shape_groups


def radius_for_pairs(num_pairs: int) -> int:
    """The radius whose half-plane pair set has `num_pairs` offsets (34 -> 5)."""
    radius = 1
    while len(pair_offsets(radius)) < num_pairs:
        radius += 1
    if len(pair_offsets(radius)) != num_pairs:
        raise ValueError(f"{num_pairs} affinities per pixel match no pair radius "
                         f"(radius {radius - 1} has {len(pair_offsets(radius - 1))}, "
                         f"radius {radius} has {len(pair_offsets(radius))})")
    return radius


def transition_matrix(affinities: Tensor, beta: float, dtype: torch.dtype) -> Tensor:
    """Sparse CSR T = D^-1 A^beta [B*h*w, B*h*w] (block diagonal over the batch), rows = pixels.

    Row p holds, in increasing column order, the normalised weights of pixel p's neighbourhood:
    itself (weight 1 before normalising) and each partner inside the image.
    """
    batch, _, height, width = affinities.shape
    offsets = pair_offsets(radius_for_pairs(affinities.shape[1]))
    # Every neighbour direction, sorted so that column indices increase along each CSR row.
    directions = sorted([(0, 0)] + offsets + [(-dy, -dx) for dy, dx in offsets])
    slot = {direction: n for n, direction in enumerate(directions)}
    device = affinities.device
    powered = affinities.to(dtype).pow(beta)
    weights = torch.zeros(batch, len(directions), height, width, dtype=dtype, device=device)
    inside = torch.zeros(len(directions), height, width, dtype=torch.bool, device=device)
    weights[:, slot[(0, 0)]] = 1.0
    inside[slot[(0, 0)]] = True
    for k, (dy, dx) in enumerate(offsets):
        (rows_i, cols_i), (rows_j, cols_j) = pair_slices(dy, dx, height, width)
        pair_weight = powered[:, k, rows_i, cols_i]
        weights[:, slot[(dy, dx)], rows_i, cols_i] = pair_weight    # i sees its partner j
        weights[:, slot[(-dy, -dx)], rows_j, cols_j] = pair_weight  # j sees i
        inside[slot[(dy, dx)], rows_i, cols_i] = True
        inside[slot[(-dy, -dx)], rows_j, cols_j] = True
    weights = weights / weights.sum(dim=1, keepdim=True)

    size, entries = batch * height * width, height * width * len(directions)
    index_dtype = torch.int32 if size * len(directions) < 2**31 else torch.int64
    # The kept (row, direction) entries of one image, in row-major order, then of each image.
    kept = inside.permute(1, 2, 0).reshape(-1).nonzero().squeeze(1)
    kept = (kept + torch.arange(batch, device=device)[:, None] * entries).reshape(-1)
    pixel = torch.arange(size, device=device).view(batch, height, width, 1)
    step = torch.tensor([dy * width + dx for dy, dx in directions], device=device)
    columns = (pixel + step).reshape(-1).index_select(0, kept).to(index_dtype)
    values = weights.permute(0, 2, 3, 1).reshape(-1).index_select(0, kept)
    row_starts = torch.zeros(size + 1, dtype=torch.int64, device=device)
    row_starts[1:] = inside.sum(dim=0).reshape(-1).repeat(batch).cumsum(dim=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(row_starts.to(index_dtype), columns, values, (size, size),
                                       check_invariants=False)


def chebyshev_coefficients(t: int, tolerance: float) -> list[float] | None:
    """c_0..c_d with |x^t - sum_k c_k T_k(x)| <= tolerance on [-1, 1], or None when d would be t.

    x^t = 2^(1-t) sum_j C(t, j) T_(t-2j)(x) (the T_0 term halved); dropping the degrees above d
    costs at most the sum of their coefficients, since |T_k| <= 1 on [-1, 1].
    """
    coefficients: dict[int, float] = {}
    for j in range(t // 2 + 1):
        degree = t - 2 * j
        log_c = math.lgamma(t + 1) - math.lgamma(j + 1) - math.lgamma(t - j + 1) + (1 - t) * math.log(2)
        coefficients[degree] = math.exp(log_c) / (2.0 if degree == 0 else 1.0)
    dropped, kept = 0.0, t
    while kept > 1 and dropped + coefficients[kept] <= tolerance:
        dropped += coefficients[kept]
        kept -= 2
    if kept == t:
        return None
    return [coefficients.get(degree, 0.0) for degree in range(kept + 1)]


def apply_power(transition: Tensor, state: Tensor, t: int, tolerance: float) -> Tensor:
    """transition^t @ state for a CSR transition [N,N] with spectrum in [-1, 1] and state [N,C]."""
    coefficients = chebyshev_coefficients(t, tolerance)
    if coefficients is None:
        for _ in range(t):
            state = transition @ state
        return state
    # Chebyshev recurrence: v_0 = state, v_1 = T v_0, v_(k+1) = 2 T v_k - v_(k-1).
    previous, current = state.clone(), transition @ state
    result = coefficients[0] * previous + coefficients[1] * current
    for coefficient in coefficients[2:]:
        previous.addmm_(transition, current, beta=-1.0, alpha=2.0)
        previous, current = current, previous
        if coefficient:
            result.add_(current, alpha=coefficient)
    return result


def block_diagonal(matrices: Sequence[Tensor]) -> Tensor:
    """Square sparse CSR matrices [n_i, n_i] -> the CSR block-diagonal matrix [sum n_i, sum n_i]."""
    sizes = [m.shape[0] for m in matrices]
    entries = [m.values().numel() for m in matrices]
    index_dtype = torch.int32 if sum(sizes) * 2 < 2**31 and sum(entries) < 2**31 else torch.int64
    row_starts = [matrices[0].crow_indices()[:1].to(index_dtype)]
    columns = []
    for matrix, row_offset, entry_offset in zip(matrices, _offsets(sizes), _offsets(entries), strict=True):
        row_starts.append(matrix.crow_indices()[1:].to(index_dtype) + entry_offset)
        columns.append(matrix.col_indices().to(index_dtype) + row_offset)
    values = torch.cat([m.values() for m in matrices])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(torch.cat(row_starts), torch.cat(columns), values,
                                       (sum(sizes), sum(sizes)), check_invariants=False)


def _offsets(sizes: Sequence[int]) -> list[int]:
    """Where each of consecutive parts of these sizes starts: [0, s0, s0 + s1, ...]."""
    return [sum(sizes[:i]) for i in range(len(sizes))]


def random_walk(affinities: Tensor, cams: Tensor, beta: float = 8.0, t: int = 256) -> Tensor:
    """affinities [B,K,h,w] (half-plane pairs, in [0, 1]), cams [B,C,h,w] -> T^t cams [B,C,h,w].

    Runs on the inputs' device, in cams' dtype (float32 or float64).
    """
    if affinities.dim() != 4 or cams.dim() != 4:
        raise ValueError(f"affinities must be [B,K,h,w] and cams [B,C,h,w], got shapes "
                         f"{tuple(affinities.shape)} and {tuple(cams.shape)}")
    if affinities.shape[0] != cams.shape[0] or affinities.shape[2:] != cams.shape[2:]:
        raise ValueError(f"affinities {tuple(affinities.shape)} and cams {tuple(cams.shape)} must "
                         f"share the batch size and the h x w grid")
    return torch.stack(random_walk_many(list(affinities), list(cams), beta, t))


def random_walk_many(affinities: Sequence[Tensor], cams: Sequence[Tensor], beta: float = 8.0,
                     t: int = 256) -> list[Tensor]:
    """Several images walked at once, each on its own grid: affinities[i] [K,h_i,w_i] (half-plane
    pairs, in [0, 1]), cams[i] [C_i,h_i,w_i] -> T_i^t cams[i] [C_i,h_i,w_i].

    One block-diagonal transition matrix holds every image's T_i (images of one grid build theirs
    together), so the t products run once for all of them (on a GPU, one kernel per product
    instead of one per image and product); the images never mix. Runs on the inputs' device, in
    cams' dtype (float32 or float64).
    """
    if len(affinities) != len(cams) or not cams:
        raise ValueError(f"need one affinity map per CAM stack and at least one image, got "
                         f"{len(affinities)} and {len(cams)}")
    for a, m in zip(affinities, cams, strict=True):
        if a.dim() != 3 or m.dim() != 3:
            raise ValueError(f"each image's affinities must be [K,h,w] and cams [C,h,w] (a batch: "
                             f"[B,K,h,w] and [B,C,h,w]), got shapes {tuple(a.shape)} and {tuple(m.shape)}")
        if a.shape[1:] != m.shape[1:] or a.shape[0] != affinities[0].shape[0]:
            raise ValueError(f"affinities {tuple(a.shape)} and cams {tuple(m.shape)} must share the "
                             f"h x w grid, and every image the number of pairs")
        if a.device != m.device or m.device != cams[0].device:
            raise ValueError(f"affinities on {a.device} but cams on {m.device}: one device for all")
        if not m.is_floating_point() or m.dtype != cams[0].dtype:
            raise ValueError(f"cams must be floating point tensors of one dtype, got {m.dtype}")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if t < 0:
        raise ValueError(f"t must be >= 0, got {t}")
    dtype, channels = cams[0].dtype, max(m.shape[0] for m in cams)
    # Images of one grid get one (batched) transition matrix; the groups' matrices are stacked
    # along the diagonal, so the rows hold the images in `order`.
    groups = same_shape_groups(cams)
    order = [i for group in groups for i in group]
    transition = block_diagonal([transition_matrix(torch.stack([affinities[i] for i in group]), beta, dtype)
                                 for group in groups])
    # Each image's maps as rows (pixels) x channels, zero-padded to the most channels: a zero map
    # walks to zero.
    state = torch.cat([F.pad(cams[i].permute(1, 2, 0).reshape(-1, cams[i].shape[0]),
                             (0, channels - cams[i].shape[0])) for i in order])
    # The truncation error of each map is at most tolerance * sqrt(max_d / min_d * h * w) * max|M|,
    # with max_d / min_d <= 2K + 1: keep it within eps * max|M| for the largest grid.
    neighbourhood = 2 * affinities[0].shape[0] + 1
    pixels = [cams[i].shape[1] * cams[i].shape[2] for i in order]
    tolerance = torch.finfo(dtype).eps / math.sqrt(neighbourhood * max(pixels))
    rows = iter(torch.split(apply_power(transition, state, t, tolerance), pixels))  # image by image, in `order`

    def unflatten(group: list[int]) -> list[Tensor]:
        """The next len(group) images' rows [h*w, channels] -> the group's walked maps [C_i,h,w]."""
        maps = []
        for i in group:
            channels_i, height, width = cams[i].shape
            maps.append(next(rows)[:, :channels_i].reshape(height, width, channels_i).permute(2, 0, 1).contiguous())
        return maps

    # map_same_shape visits the groups of same_shape_groups(cams) in order, as the rows hold them.
    return map_same_shape(unflatten, cams)
