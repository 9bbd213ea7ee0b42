"""Fully connected CRF (DenseCRF) mean-field inference in PyTorch, with pydensecrf's semantics.

The model is Krähenbühl and Koltun's, as pydensecrf (`DenseCRF2D`) sets it up from class probabilities P (K, H, W)
and an RGB image:

- unary U = -log(clip(P, 1e-5, 1)) (pydensecrf's `unary_from_softmax`);
- a Gaussian kernel on the features f = (x / gaussian_sxy, y / gaussian_sxy) and a bilateral kernel on
  f = (x / bilateral_sxy, y / bilateral_sxy, r / srgb, g / srgb, b / srgb), x the column and y the row, each
  k(f_i, f_j) = exp(-|f_i - f_j|^2 / 2) over all pairs of pixels, the pixel itself included;
- symmetric normalisation of each kernel, K~ = D^-1/2 K D^-1/2 with D = K 1 (`NORMALIZE_SYMMETRIC`);
- Potts compatibility with weights `gaussian_compat` and `bilateral_compat`;
- mean field: Q0 = softmax(-U), then `iterations` times Q = softmax(-U + sum_m w_m K~_m Q), over the classes.

Two ways of applying the kernels ("messages") are behind `dense_crf(..., backend=...)`:

- `"exact"`: the N x N kernels, evaluated in row blocks. O(N^2): for small images and as the reference in tests.
- `"lattice"` (default): a permutohedral lattice (Adams et al. 2010) written in PyTorch, following the
  construction pydensecrf uses (elevation, rounding to the closest remainder-0 point, barycentric weights, a
  [1/2, 1, 1/2] blur along each of the d + 1 lattice directions, and the same scaling constants). It is chosen over
  a bilateral grid because it is the approximation pydensecrf itself makes, so the two agree on the labels rather
  than only approximating the same ideal kernel differently, and because its cost is linear in the feature
  dimension (d + 1 vertices per pixel) where a 5-D grid needs 2^5 corners per pixel and a dense 5-D array of cells.
  Splatting and slicing are weighted sums of rows (`embedding_bag`), so the same code runs on the CPU and CUDA.
- `"pydensecrf2"`: the optional C++ package (extra `crf`), as a third backend and as a check.

Everything runs on the device of the probabilities, in float32.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from itaclip_core.errors import UserError

BACKENDS = ("lattice", "exact", "pydensecrf2")
UNARY_CLIP = 1e-5  # pydensecrf's unary_from_softmax clip

# Exact kernels are evaluated in blocks of about this many (row x N) elements.
EXACT_BLOCK_ELEMENTS = 1 << 22
# Up to this many pixel pairs the exact kernels are kept as N x N matrices (64 MiB in float32).
EXACT_CACHE_ELEMENTS = 1 << 24
# The lattice mean field slices, adds the unary and normalises this many pixels at a time.
LATTICE_CHUNK_PIXELS = 32768
# The lattice splat first sums each lattice point's pixels within blocks of this many pixels.
SPLAT_BLOCK_PIXELS = 32768


class CRFSettingError(UserError, ValueError):
    """A DenseCRF setting or input is out of range."""


# --------------------------------------------------------------------------------------------------- features
def gaussian_features(height: int, width: int, sxy: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, 2) features (x / sxy, y / sxy) of the pixels in row-major order (pydensecrf's addPairwiseGaussian)."""
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float32, device=device),
        torch.arange(width, dtype=torch.float32, device=device),
        indexing="ij",
    )
    return torch.stack([xs.reshape(-1) / sxy, ys.reshape(-1) / sxy], dim=1)


def bilateral_features(image: torch.Tensor, sxy: float, srgb: float) -> torch.Tensor:
    """(N, 5) features (x / sxy, y / sxy, r / srgb, g / srgb, b / srgb) of an (H, W, 3) image, row-major."""
    height, width = image.shape[:2]
    position = gaussian_features(height, width, sxy, image.device)
    colour = image.reshape(-1, 3).float() / srgb
    return torch.cat([position, colour], dim=1)


# --------------------------------------------------------------------------------------------------- kernels
class ExactKernel:
    """The symmetric-normalised kernel exp(-|f_i - f_j|^2 / 2) over all pairs of pixels.

    Up to `EXACT_CACHE_ELEMENTS` pairs the normalised N x N matrix is built once and each application is a matrix
    product; beyond that it is recomputed in row blocks at every application (O(N^2) time, bounded memory).
    """

    def __init__(self, features: torch.Tensor, block_elements: int | None = None) -> None:
        self.features = features.float()
        count = features.shape[0]
        block_elements = EXACT_BLOCK_ELEMENTS if block_elements is None else block_elements
        self.block = max(1, block_elements // max(1, count))
        self.matrix: torch.Tensor | None = None
        if count * count <= EXACT_CACHE_ELEMENTS:
            self.matrix = torch.cat([self._block(start) for start in range(0, count, self.block)])  # (N, N)
            self.norm = 1.0 / torch.sqrt(self.matrix.sum(dim=1, keepdim=True) + 1e-20)  # (N, 1)
            self.matrix = self.norm * self.matrix * self.norm.T
        else:
            ones = torch.ones(count, 1, dtype=torch.float32, device=features.device)
            self.norm = 1.0 / torch.sqrt(self._raw(ones) + 1e-20)  # (N, 1)

    def _block(self, start: int) -> torch.Tensor:
        """Rows start : start + block of the kernel matrix."""
        rows = self.features[start : start + self.block]  # (b, d)
        dist2 = (rows[:, None, :] - self.features[None, :, :]).square().sum(dim=-1)  # (b, N)
        return torch.exp(-0.5 * dist2)

    def _raw(self, values: torch.Tensor) -> torch.Tensor:
        """K @ values for values (N, C), block by block."""
        out = torch.empty_like(values)
        for start in range(0, self.features.shape[0], self.block):
            out[start : start + self.block] = self._block(start) @ values
        return out

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        """K~ @ values for values (N, C)."""
        if self.matrix is not None:
            return self.matrix @ values
        return self.norm * self._raw(self.norm * values)


class PermutohedralKernel:
    """The symmetric-normalised Gaussian kernel on features (N, d), approximated on a permutohedral lattice.

    The lattice is built as in pydensecrf's `Permutohedral::init`: features are scaled by
    sqrt(2/3) (d + 1) / sqrt((i + 1)(i + 2)), elevated onto the hyperplane x . 1 = 0 of R^{d+1}, rounded to the
    closest remainder-0 lattice point, and each pixel is splatted onto the d + 1 vertices of its simplex with its
    barycentric weights. Filtering is splat, a blur v + (v_prev + v_next) / 2 along each lattice direction in order
    0..d (missing neighbours count as 0), and slice, times pydensecrf's constant 1 / (1 + 2^-d).
    """

    def __init__(self, features: torch.Tensor) -> None:
        feats = features.float()
        count, dim = feats.shape
        device = feats.device
        self.dim = dim
        # Elevation (pydensecrf: inv_std_dev = sqrt(2/3) (d + 1); scale_i = inv_std_dev / sqrt((i + 1)(i + 2))).
        inv_std = math.sqrt(2.0 / 3.0) * (dim + 1)
        scale = torch.tensor(
            [inv_std / math.sqrt((i + 2) * (i + 1)) for i in range(dim)], dtype=torch.float32, device=device
        )
        cf = feats * scale  # (N, d)
        suffix = cf.flip(1).cumsum(1).flip(1)  # suffix[:, j] = sum_{i >= j} cf[:, i], summed from the last
        elevated = torch.empty(count, dim + 1, dtype=torch.float32, device=device)
        elevated[:, 0] = suffix[:, 0]
        steps = torch.arange(1, dim + 1, dtype=torch.float32, device=device)
        tail = torch.cat([suffix[:, 1:], torch.zeros(count, 1, device=device)], dim=1)  # sum_{i >= j} for j = 1..d
        elevated[:, 1:] = tail - steps * cf
        # Closest remainder-0 point: each coordinate rounded to a multiple of d + 1.
        down_factor = torch.tensor(1.0 / (dim + 1), dtype=torch.float32)
        v = elevated * down_factor
        up = torch.ceil(v) * (dim + 1)
        down = torch.floor(v) * (dim + 1)
        rem0 = torch.where(up - elevated < elevated - down, up, down)
        total = torch.round(rem0.sum(dim=1) / (dim + 1)).long()  # (N,) how far off the plane the rounding went
        # Rank of each coordinate's residual (ties: the later coordinate ranks higher, as in pydensecrf).
        resid = elevated - rem0
        later = torch.triu(torch.ones(dim + 1, dim + 1, dtype=torch.bool, device=device), diagonal=1)  # j > i
        greater = resid[:, None, :] > resid[:, :, None]  # [n, i, j]: resid_j > resid_i
        greater_eq = resid[:, None, :] >= resid[:, :, None]
        rank = (greater & later).sum(dim=2) + (greater_eq & ~later & ~torch.eye(dim + 1, dtype=torch.bool,
                                                                                 device=device)).sum(dim=2)
        rank = rank + total[:, None]
        rem0 = rem0.long()
        low = rank < 0
        high = rank > dim
        rank = torch.where(low, rank + dim + 1, torch.where(high, rank - dim - 1, rank))
        rem0 = torch.where(low, rem0 + dim + 1, torch.where(high, rem0 - dim - 1, rem0))
        # Barycentric weights.
        vals = (elevated - rem0.float()) * down_factor  # (N, d + 1)
        bary = torch.zeros(count, dim + 2, dtype=torch.float32, device=device)
        bary.scatter_add_(1, dim - rank, vals)
        bary.scatter_add_(1, dim - rank + 1, -vals)
        bary[:, 0] += 1.0 + bary[:, dim + 1]
        weights = bary[:, : dim + 1]  # (N, d + 1), one per remainder
        # The d + 1 vertices: key_i = rem0_i + canonical[r][rank_i], canonical[r][j] = r if j <= d - r else r - d - 1,
        # i.e. rem0_i + r - (d + 1) [rank_i > d - r].
        remainders = torch.arange(dim + 1, device=device)
        keys = (rem0[:, None, :dim] + remainders[None, :, None]
                - (dim + 1) * (rank[:, None, :dim] > dim - remainders[None, :, None]))  # (N, d + 1, d)
        keys = keys.reshape(-1, dim)
        # Hash the keys: a mixed-radix code of the coordinates (with room for the +-d neighbour steps).
        lowest = keys.min(dim=0).values - (dim + 1)
        spans = keys.max(dim=0).values - lowest + dim + 2
        radix = torch.ones(dim, dtype=torch.long, device=device)
        product = 1
        for i in range(dim - 1, -1, -1):
            radix[i] = product
            product *= int(spans[i])
        if product >= 2**62:
            raise CRFSettingError(
                "the lattice is too large to index (feature range over scale too wide): increase the kernel's sxy or "
                "srgb, or use backend='pydensecrf2'"
            )
        codes = ((keys - lowest) * radix).sum(dim=1)
        # One stable sort gives the lattice points (in code order), each entry's point and the splat order.
        sorted_codes, order = torch.sort(codes, stable=True)
        unique, sorted_point, per_point = torch.unique_consecutive(sorted_codes, return_inverse=True,
                                                                   return_counts=True)
        points = unique.shape[0]
        inverse = torch.empty_like(sorted_point)
        inverse[order] = sorted_point
        first = torch.cumsum(per_point, 0) - per_point  # first sorted entry of each point
        self.num_points = points
        # Neighbours along each direction j (0 = missing; lattice values live in rows 1..M). The neighbour
        # key_j^- = key - 1 + (d + 1) e_j (key - 1 for j = d) and key_j^+ = key + 1 - (d + 1) e_j have the codes
        # code(key) -+ (sum(radix) - (d + 1) radix_j): all 2 (d + 1) of them are looked up in one search.
        step = torch.cat([radix, torch.zeros(1, dtype=torch.long, device=device)]) * (dim + 1)
        delta = step - radix.sum()  # (d + 1,): code(key_j^-) - code(key)
        wanted = unique[:, None] + torch.cat([delta, -delta])[None, :]  # (M, 2 (d + 1))
        pos = torch.searchsorted(unique, wanted.reshape(-1)).clamp(max=points - 1).reshape(wanted.shape)
        found = torch.where(unique[pos] == wanted, pos + 1, torch.zeros_like(pos))
        found = torch.cat([torch.zeros(1, 2 * (dim + 1), dtype=torch.long, device=device), found])  # row 0
        neighbours = [(found[:, j].contiguous(), found[:, dim + 1 + j].contiguous()) for j in range(dim + 1)]
        self.neighbours = neighbours
        # Splat and slice as weighted bags of rows (`embedding_bag`): slicing sums d + 1 lattice rows per pixel,
        # splatting sums the pixel rows of each lattice point (pixels sorted by lattice point, CSR-like offsets).
        self.count = count
        self.slice_index = (inverse.reshape(count, dim + 1) + 1).contiguous()  # (N, d + 1) rows of the lattice
        self.slice_weight = weights.contiguous()  # (N, d + 1)
        self.splat_index = torch.div(order, dim + 1, rounding_mode="floor")  # pixel of each sorted entry
        self.splat_weight = weights.reshape(-1)[order].contiguous()
        starts = torch.cat([torch.zeros(1, dtype=torch.long, device=device), first])
        self.splat_offsets = starts  # bag m (lattice row m) = entries starts[m] : starts[m + 1]; row 0 is empty
        self.alpha = 1.0 / (1.0 + 2.0 ** (-dim))
        ones = torch.ones(count, 1, dtype=torch.float32, device=device)
        norm = 1.0 / torch.sqrt(self._raw(ones) + 1e-20)  # (N, 1)
        # Fold the symmetric normalisation into the weights: K~ v = n * slice(blur(splat(n * v))).
        self.splat_weight = self.splat_weight * norm[self.splat_index, 0]
        self.slice_weight = self.slice_weight * norm
        self.norm = norm

    def blur_bags(self, direction: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Blur along `direction` as bags of lattice rows: (index, count per row, weight) for rows 0..M, where
        row r's bag is r itself (weight 1) and its existing neighbours (weight 1/2 each); row 0 (the zero row
        that missing neighbours point at) gets an empty bag."""
        n1, n2 = self.neighbours[direction]
        rows = torch.arange(n1.shape[0], device=n1.device)
        index = torch.stack([rows, n1, n2], dim=1)  # (M + 1, 3)
        weight = torch.tensor([1.0, 0.5, 0.5], device=n1.device).expand(index.shape)
        keep = index > 0
        return index[keep], keep.sum(dim=1), weight[keep]

    def _raw(self, values: torch.Tensor) -> torch.Tensor:
        """The lattice's approximation of K @ values for values (N, C) (with the current splat/slice weights)."""
        lattice = F.embedding_bag(
            self.splat_index, values, self.splat_offsets, mode="sum", per_sample_weights=self.splat_weight
        )  # (M + 1, C); row 0 (missing neighbours) is an empty bag, i.e. 0
        for n1, n2 in self.neighbours:
            lattice = lattice + 0.5 * (lattice[n1] + lattice[n2])
        return F.embedding_bag(self.slice_index, lattice * self.alpha, mode="sum",
                               per_sample_weights=self.slice_weight)

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        """K~ @ values for values (N, C)."""
        return self._raw(values)


class CombinedLatticeMessages:
    """sum_m w_m K~_m v for several permutohedral kernels, with one splat, one blur pass per lattice direction and
    one slice over all their lattices together.

    The lattices' rows are stacked into one table: one `embedding_bag` splats v onto all of them; blur step j is one
    `embedding_bag` over the whole table whose bag for a row is the row itself (weight 1) and its two neighbours
    along direction j of its own lattice (weight 1/2 each, missing ones left out); a kernel with fewer directions
    than j keeps its rows (a bag of the row alone). The slice sums (d_1 + 1) + (d_2 + 1) + ... table rows per pixel,
    with the Potts weights and pydensecrf's constants folded into the slice weights. Same result as applying the
    kernels one by one (up to float summation order), with a handful of large operations per iteration.
    """

    def __init__(self, kernels: list[tuple[float, PermutohedralKernel]]) -> None:
        splat_index, splat_weight, offsets, slice_index, slice_weight = [], [], [], [], []
        row = 0
        entries = 0
        starts = []
        for weight, kernel in kernels:
            starts.append(row)
            splat_index.append(kernel.splat_index)
            splat_weight.append(kernel.splat_weight)
            offsets.append(kernel.splat_offsets + entries)
            slice_index.append(kernel.slice_index + row)
            slice_weight.append(kernel.slice_weight * (weight * kernel.alpha))
            row += kernel.num_points + 1
            entries += kernel.splat_index.shape[0]
        self.rows = row
        self.splat_index = torch.cat(splat_index)
        self.splat_weight = torch.cat(splat_weight)
        self.splat_offsets = torch.cat(offsets)
        self.slice_index = torch.cat(slice_index, dim=1).contiguous()
        self.slice_weight = torch.cat(slice_weight, dim=1).contiguous()
        # Two-level splat: first one bag per (block of SPLAT_BLOCK_PIXELS pixels, table row), so each bag reads
        # rows of Q that lie close together (a bilateral lattice point's pixels are spread over the image), then
        # one bag per table row summing its blocks' partial sums.
        total = self.splat_index.shape[0]
        counts = torch.diff(self.splat_offsets, append=self.splat_offsets.new_tensor([total]))
        entry_row = torch.repeat_interleave(torch.arange(self.rows, device=self.splat_index.device), counts)
        block_key = torch.div(self.splat_index, SPLAT_BLOCK_PIXELS, rounding_mode="floor") * self.rows + entry_row
        block_key, order = torch.sort(block_key, stable=True)
        partial_key, per_partial = torch.unique_consecutive(block_key, return_counts=True)
        self.block_index = self.splat_index[order]
        self.block_weight = self.splat_weight[order]
        self.block_offsets = torch.cumsum(per_partial, 0) - per_partial
        partial_row, self.partial_index = torch.sort(partial_key % self.rows, stable=True)
        self.partial_offsets = torch.searchsorted(partial_row, torch.arange(self.rows, device=partial_row.device))
        # Each lattice's blur steps, as (index, offsets, weights) of one bag per row of that lattice.
        self.parts = []
        for start, (_, kernel) in zip(starts, kernels):
            steps = []
            for direction in range(kernel.dim + 1):
                index, counts, weights = kernel.blur_bags(direction)
                steps.append((index, torch.cumsum(counts, 0) - counts, weights))
            self.parts.append((start, kernel.num_points + 1, steps))

    def lattice_into(self, values: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Splat and blur values (N, C) into out[:rows] (rows = sum of M_m + 1), and return that view."""
        partial = F.embedding_bag(self.block_index, values, self.block_offsets, mode="sum",
                                  per_sample_weights=self.block_weight)
        table = F.embedding_bag(self.partial_index, partial, self.partial_offsets, mode="sum")
        for start, rows, steps in self.parts:
            lattice = table[start : start + rows]
            for index, offsets, weights in steps:
                lattice = F.embedding_bag(index, lattice, offsets, mode="sum", per_sample_weights=weights)
            out[start : start + rows] = lattice
        return out[: self.rows]

    def lattice(self, values: torch.Tensor) -> torch.Tensor:
        """Splat and blur: the stacked lattice values (sum of M_m + 1, C)."""
        out = torch.empty(self.rows, values.shape[1], dtype=values.dtype, device=values.device)
        return self.lattice_into(values, out)

    def slice(self, table: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The summed messages of pixels start:stop from the lattice values."""
        return F.embedding_bag(self.slice_index[start:stop], table, mode="sum",
                               per_sample_weights=self.slice_weight[start:stop])

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        return self.slice(self.lattice(values))


def lattice_mean_field(unary: torch.Tensor, messages: CombinedLatticeMessages, iterations: int,
                       chunk_pixels: int = LATTICE_CHUNK_PIXELS) -> torch.Tensor:
    """`mean_field` for lattice messages (same result up to float summation order).

    The lattice table and -unary share one (rows + N, K) array, and each pixel's slice bag also
    holds its own -unary row (weight 1), so one `embedding_bag` gives a block of pixels' energies; the softmax of
    the block is written straight into Q. The splat and blur read the previous Q before any block of it is
    overwritten.
    """
    store = torch.empty(messages.rows + unary.shape[0], unary.shape[1], dtype=torch.float32, device=unary.device)
    torch.neg(unary, out=store[messages.rows :])
    return lattice_mean_field_in_store(store, messages, iterations, chunk_pixels)


def lattice_mean_field_in_store(store: torch.Tensor, messages: CombinedLatticeMessages, iterations: int,
                                chunk_pixels: int = LATTICE_CHUNK_PIXELS) -> torch.Tensor:
    """`lattice_mean_field` on a (rows + N, K) array `store` whose last N rows hold -unary, rows =
    `messages.rows` (the first rows are working space for the lattice values). Returns Q (N, K)."""
    rows = messages.rows
    count = store.shape[0] - rows
    device = store.device
    pixel_rows = torch.arange(rows, rows + count, device=device)[:, None]
    index = torch.cat([messages.slice_index, pixel_rows], dim=1).contiguous()
    weight = torch.cat([messages.slice_weight, torch.ones(count, 1, device=device)], dim=1).contiguous()
    q = torch.softmax(store[rows:], dim=1)
    for _ in range(iterations):
        messages.lattice_into(q, store)
        for start in range(0, count, chunk_pixels):
            stop = min(start + chunk_pixels, count)
            energy = F.embedding_bag(index[start:stop], store, mode="sum", per_sample_weights=weight[start:stop])
            torch.softmax(energy, dim=1, out=q[start:stop])
    return q


KERNELS: dict[str, Callable[[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    "exact": ExactKernel,
    "lattice": PermutohedralKernel,
}


# --------------------------------------------------------------------------------------------------- checks
def check_settings(
    iterations: int,
    gaussian_sxy: float,
    gaussian_compat: float,
    bilateral_sxy: float,
    bilateral_srgb: float,
    bilateral_compat: float,
    backend: str = "lattice",
) -> None:
    """Raise `CRFSettingError` naming the first out-of-range setting."""
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 0:
        raise CRFSettingError(f"crf iterations is {iterations!r}: give a non-negative integer (default 10)")
    for name, value in (("gaussian_sxy", gaussian_sxy), ("bilateral_sxy", bilateral_sxy),
                        ("bilateral_srgb", bilateral_srgb)):
        if not isinstance(value, (int, float, np.number)) or not math.isfinite(value) or value <= 0:
            raise CRFSettingError(f"crf {name} is {value!r}: give a finite positive standard deviation")
    for name, value in (("gaussian_compat", gaussian_compat), ("bilateral_compat", bilateral_compat)):
        if not isinstance(value, (int, float, np.number)) or not math.isfinite(value) or value < 0:
            raise CRFSettingError(f"crf {name} is {value!r}: give a finite non-negative Potts weight (0 disables it)")
    if backend not in BACKENDS:
        raise CRFSettingError(f"crf backend is {backend!r}: choose one of {', '.join(BACKENDS)}")


def _as_probs(probs: torch.Tensor | np.ndarray) -> torch.Tensor:
    tensor = torch.as_tensor(probs)
    if tensor.ndim != 3 or not tensor.is_floating_point():
        raise CRFSettingError(
            f"probs has shape {tuple(tensor.shape)} and dtype {tensor.dtype}: expected (K, H, W) float probabilities"
        )
    if tensor.shape[0] < 1 or tensor.shape[1] < 1 or tensor.shape[2] < 1:
        raise CRFSettingError(f"probs has shape {tuple(tensor.shape)}: every dimension must be at least 1")
    low, high = torch.aminmax(tensor)  # NaN propagates to both; one pass, no (K, H, W) mask
    if not (math.isfinite(float(low)) and math.isfinite(float(high))):
        raise CRFSettingError("probs holds NaN or infinite values: give class probabilities in [0, 1]")
    return tensor


def _as_image(image: torch.Tensor | np.ndarray, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    tensor = torch.as_tensor(np.ascontiguousarray(image) if isinstance(image, np.ndarray) else image)
    if tensor.dtype != torch.uint8 or tensor.ndim != 3 or tensor.shape[2] != 3:
        raise CRFSettingError(
            f"image has shape {tuple(tensor.shape)} and dtype {tensor.dtype}: expected (H, W, 3) uint8 RGB"
        )
    if tuple(tensor.shape[:2]) != size:
        raise CRFSettingError(f"image is {tuple(tensor.shape[:2])} but probs are {size} (H, W): give the same size")
    return tensor.to(device)


# --------------------------------------------------------------------------------------------------- inference
def mean_field(
    unary: torch.Tensor,
    kernels: list[tuple[float, Callable[[torch.Tensor], torch.Tensor]]],
    iterations: int,
) -> torch.Tensor:
    """pydensecrf's `DenseCRF::inference` with Potts terms: unary (N, K) energies -> Q (N, K).

    Args:
        unary: (N, K) unary energies.
        kernels: (Potts weight w, normalised kernel K~) pairs; each iteration adds w K~ Q to -unary.
        iterations: mean-field iterations.
    """
    q = torch.softmax(-unary, dim=1)
    for _ in range(iterations):
        energy = None
        for weight, kernel in kernels:
            message = kernel(q)
            if energy is None:
                energy = message if weight == 1.0 else message.mul_(weight)
            else:
                energy.add_(message, alpha=weight)
        energy = -unary if energy is None else energy.sub_(unary)
        q = torch.softmax(energy, dim=1)
    return q


def _pydensecrf2(probs: np.ndarray, image: np.ndarray, iterations: int, gaussian_sxy: float, gaussian_compat: float,
                 bilateral_sxy: float, bilateral_srgb: float, bilateral_compat: float) -> np.ndarray:
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as error:
        raise ImportError(
            "backend='pydensecrf2' needs the optional package pydensecrf2 (a C++ compiler, Python 3.11 or 3.12): "
            "pip install 'itaclip-core[crf]' or make install; or use backend='lattice'"
        ) from error
    classes, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, classes)
    unary = -np.log(np.clip(probs, UNARY_CLIP, 1.0)).reshape(classes, -1).astype(np.float32)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    if gaussian_compat > 0:
        crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    if bilateral_compat > 0:
        crf.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=np.ascontiguousarray(image),
                                 compat=bilateral_compat)
    q = np.array(crf.inference(iterations), dtype=np.float32)
    return q.reshape(classes, height, width)


def dense_crf(
    probs: torch.Tensor | np.ndarray,
    image: torch.Tensor | np.ndarray,
    iterations: int = 10,
    gaussian_sxy: float = 3.0,
    gaussian_compat: float = 3.0,
    bilateral_sxy: float = 80.0,
    bilateral_srgb: float = 13.0,
    bilateral_compat: float = 10.0,
    backend: str = "lattice",
) -> torch.Tensor | np.ndarray:
    """Refine class probabilities with a fully connected CRF (pydensecrf's model and mean-field inference).

    Args:
        probs: (K, H, W) class probabilities (a tensor or a numpy array), e.g. a softmax over classes.
        image: (H, W, 3) uint8 RGB image of the same size (tensor or numpy).
        iterations: mean-field iterations (0 returns softmax(log clip(P)), i.e. P renormalised after the clip).
        gaussian_sxy, gaussian_compat: positional kernel's standard deviation in pixels and Potts weight.
        bilateral_sxy, bilateral_srgb, bilateral_compat: bilateral kernel's standard deviations in pixels and in
            colour levels, and its Potts weight. A weight of 0 leaves that kernel out.
        backend: "lattice" (permutohedral lattice, fast), "exact" (O(N^2), small images) or "pydensecrf2" (the C++
            package, CPU).

    Returns:
        (K, H, W) float32 refined probabilities on the probabilities' device: a tensor for a tensor input, a numpy
        array for a numpy input.
    """
    check_settings(iterations, gaussian_sxy, gaussian_compat, bilateral_sxy, bilateral_srgb, bilateral_compat,
                   backend)
    as_numpy = isinstance(probs, np.ndarray)
    tensor = _as_probs(probs)
    classes, height, width = tensor.shape
    device = tensor.device
    rgb = _as_image(image, (height, width), device)
    if backend == "pydensecrf2":
        out = _pydensecrf2(tensor.detach().float().cpu().numpy(), rgb.cpu().numpy(), int(iterations),
                           float(gaussian_sxy), float(gaussian_compat), float(bilateral_sxy), float(bilateral_srgb),
                           float(bilateral_compat))
        return out if as_numpy else torch.from_numpy(out).to(device)
    with torch.no_grad():
        log_probs = torch.log_(tensor.float().clamp(UNARY_CLIP, 1.0)).reshape(classes, -1).T  # -unary, (N, K)
        make = KERNELS[backend]
        kernels = []
        if gaussian_compat > 0 and iterations > 0:
            positions = gaussian_features(height, width, float(gaussian_sxy), device)
            kernels.append((float(gaussian_compat), make(positions)))
        if bilateral_compat > 0 and iterations > 0:
            kernels.append((float(bilateral_compat),
                            make(bilateral_features(rgb, float(bilateral_sxy), float(bilateral_srgb)))))
        if backend == "lattice" and kernels:
            messages = CombinedLatticeMessages(kernels)
            store = torch.empty(messages.rows + height * width, classes, dtype=torch.float32, device=device)
            store[messages.rows :] = log_probs
            q = lattice_mean_field_in_store(store, messages, int(iterations))
        else:
            q = mean_field(log_probs.neg().contiguous(), kernels, int(iterations))
        out = torch.empty(classes, height * width, dtype=torch.float32, device=device)
        out.copy_(q.T)  # one 2-D transposing copy (much faster than .contiguous() of the 3-D view)
        out = out.reshape(classes, height, width)
    return out.cpu().numpy() if as_numpy else out
