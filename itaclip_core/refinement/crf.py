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
- `"lattice"` (default): a permutohedral lattice (Adams et al. 2010) written in PyTorch, built as pydensecrf's x86
  (SSE) build computes it, in its float32 arithmetic (elevation summed from the last coordinate, round-half-even to
  the closest remainder-0 point, pairwise ranks, barycentric weights, a [1/2, 1, 1/2] blur along each of the d + 1
  lattice directions, the same scaling constants), so its probabilities equal pydensecrf2's to float precision.
  It is chosen over a bilateral grid because it is the approximation pydensecrf itself makes, so the two agree
  rather than only approximating the same ideal kernel differently, and because its cost is linear in the feature
  dimension (d + 1 vertices per pixel) where a 5-D grid needs 2^5 corners per pixel and a dense 5-D array of cells.
  Splatting and slicing are weighted sums of rows (`embedding_bag`), so the same code runs on the CPU and CUDA. The
  mean field runs over tiles of pixels (`PixelTiles`; one tile on CUDA), one pass over the tiles per iteration, so
  that a tile's lattice rows stay in the cache and no (pixels x classes) array is written more than once per pass.
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
# On the CPU the lattice mean field runs over tiles of this many (rows, columns) of pixels (on CUDA: one tile).
LATTICE_TILE = (64, 128)
# A lattice kernel applied on its own splats blocks of about this many (pixel, vertex, channel) values at a time.
SPLAT_BLOCK_ELEMENTS = 1 << 22
# The lattice blur runs over blocks of this many lattice rows.
BLUR_BLOCK_ROWS = 4096
# A lattice is built for blocks of this many pixels at a time (small temporaries).
LATTICE_BUILD_BLOCK = 32768
# Simplex keys pack the vertex-0 code and the rank permutation into one int64 below this bound (else the vertex-0
# codes are numbered first).
SIMPLEX_PACK_LIMIT = 2**62


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


def _simplices(feats: torch.Tensor, rem0_out: torch.Tensor, rank_out: torch.Tensor,
               weights_out: torch.Tensor) -> None:
    """pydensecrf's `Permutohedral::init` for features (n, d), in its float32 arithmetic and order (its SSE build,
    the one on x86): write each pixel's closest remainder-0 point (its first d coordinates), the rank of each
    coordinate's residual and the d + 1 barycentric weights. Works on one row per coordinate, (d + 1, n)."""
    count, dim = feats.shape
    device = feats.device
    # Elevation (pydensecrf: inv_std_dev = sqrt(2/3) (d + 1) in float32; scale_i = 1 / sqrt((i + 1)(i + 2)) *
    # inv_std_dev in double, stored in float32), summed from the last coordinate as pydensecrf sums (a cumsum
    # would accumulate in double on the CPU).
    inv_std = float(np.float32(math.sqrt(2.0 / 3.0) * (dim + 1)))
    scale = torch.tensor([1.0 / math.sqrt((i + 2) * (i + 1)) * inv_std for i in range(dim)], dtype=torch.float32,
                         device=device)
    cf = (feats * scale).T.contiguous()  # (d, n)
    elevated = torch.empty(dim + 1, count, dtype=torch.float32, device=device)
    total = torch.zeros(count, dtype=torch.float32, device=device)
    for j in range(dim, 0, -1):
        torch.sub(total, cf[j - 1] * j, out=elevated[j])
        total += cf[j - 1]
    elevated[0] = total
    # Closest remainder-0 point: each coordinate / (d + 1) rounded to the nearest integer, ties to even (the
    # SSE path of pydensecrf, the one built on x86), times d + 1.
    down_factor = torch.tensor(1.0 / (dim + 1), dtype=torch.float32, device=device)
    rounded = torch.round(elevated * down_factor)
    rem0 = rounded * (dim + 1)
    plane = rounded.sum(dim=0).to(torch.int8)  # how far off the plane the rounding went
    # Rank of each coordinate's residual, counted pair by pair as pydensecrf counts (of two equal residuals the
    # later coordinate ranks higher).
    resid = elevated - rem0
    rank = torch.zeros(dim + 1, count, dtype=torch.int8, device=device)
    for i in range(dim):
        for j in range(i + 1, dim + 1):
            less = resid[i] < resid[j]
            rank[i] += less
            rank[j] += ~less
    rank += plane
    wrap = (rank < 0).to(torch.int8) - (rank > dim).to(torch.int8)  # back onto the plane
    rank += wrap * (dim + 1)
    rem0 += wrap * (dim + 1)
    # Barycentric weights.
    vals = (elevated - rem0).mul_(down_factor)  # (d + 1, n)
    bary = torch.zeros(dim + 2, count, dtype=torch.float32, device=device)
    slot = (dim - rank).long()
    bary.scatter_add_(0, slot, vals)
    bary.scatter_add_(0, slot + 1, -vals)
    bary[0] += 1.0 + bary[dim + 1]
    weights_out.copy_(bary[: dim + 1].T)
    rem0_out.copy_(rem0[:dim].T)
    rank_out.copy_(rank.T)


class PermutohedralKernel:
    """The symmetric-normalised Gaussian kernel on features (N, d), approximated on a permutohedral lattice.

    The lattice is built as in pydensecrf's `Permutohedral::init`: features are scaled by
    sqrt(2/3) (d + 1) / sqrt((i + 1)(i + 2)), elevated onto the hyperplane x . 1 = 0 of R^{d+1}, rounded to the
    closest remainder-0 lattice point, and each pixel is splatted onto the d + 1 vertices of its simplex with its
    barycentric weights. Filtering is splat, a blur v + (v_prev + v_next) / 2 along each lattice direction in order
    0..d (missing neighbours count as 0), and slice, times pydensecrf's constant 1 / (1 + 2^-d).

    Attributes used by the mean field: `slice_index` (N, d + 1), the lattice rows 1..M of each pixel's vertices (row
    0 is a zero row that missing neighbours point at); `slice_weight` (N, d + 1), the barycentric weights times the
    symmetric normalisation n = (K 1)^-1/2 of the pixel, so that K~ v = alpha * slice(blur(splat(v))) with the same
    weights for splat and slice; `neighbours`, per direction the rows of the two neighbours of rows 0..M.
    """

    def __init__(self, features: torch.Tensor) -> None:
        feats = features.float()
        count, dim = feats.shape
        device = feats.device
        self.dim = dim
        self.count = count
        # Per pixel, a block at a time (small temporaries): the closest remainder-0 point rem0 (first d
        # coordinates), the rank of each coordinate's residual and the barycentric weights.
        rem0 = torch.empty(count, dim, dtype=torch.int32, device=device)
        rank = torch.empty(count, dim + 1, dtype=torch.uint8, device=device)
        weights = torch.empty(count, dim + 1, dtype=torch.float32, device=device)
        for start in range(0, count, LATTICE_BUILD_BLOCK):
            stop = min(start + LATTICE_BUILD_BLOCK, count)
            _simplices(feats[start:stop], rem0[start:stop], rank[start:stop], weights[start:stop])
        # Codes of the lattice points: the key (first d coordinates) in mixed radix, coordinate 0 most
        # significant, so code order is the lexicographic order of the keys; each digit has room for the vertices
        # (rem0 +- d) and their blur neighbours (+- d + 1 more).
        lowest = rem0.amin(dim=0).long() - 2 * dim - 1
        spans = rem0.amax(dim=0).long() + dim - lowest + dim + 2
        radix = torch.ones(dim, dtype=torch.long, device=device)
        product = 1
        for i, span in reversed(list(enumerate(spans.tolist()))):
            radix[i] = product
            product *= int(span)
        if product >= 2**62:
            raise CRFSettingError(
                "the lattice is too large to index (feature range over scale too wide): increase the kernel's sxy or "
                "srgb, or use backend='pydensecrf2'"
            )
        # A pixel's simplex is (rem0, rank): many pixels share one, so the vertices are found per simplex.
        base = torch.zeros(count, dtype=torch.long, device=device)  # (N,) code of vertex 0 (= rem0)
        for i, (low, place) in enumerate(zip(lowest.tolist(), radix.tolist())):  # a column at a time
            base += (rem0[:, i].long() - low) * place
        perms = (dim + 1) ** (dim + 1)  # rank permutations coded in base d + 1
        rank_code = torch.zeros(count, dtype=torch.long, device=device)
        for i in range(dim + 1):
            rank_code += rank[:, i].long() * (dim + 1) ** i
        if product * perms < SIMPLEX_PACK_LIMIT:
            simplex_key, simplex_of = torch.unique(base * perms + rank_code, return_inverse=True)
            simplex_base = torch.div(simplex_key, perms, rounding_mode="floor")
        else:  # codes too wide to pack with the rank: number the vertex-0 codes first
            bases, base_of = torch.unique(base, return_inverse=True)
            simplex_key, simplex_of = torch.unique(base_of * perms + rank_code, return_inverse=True)
            simplex_base = bases[torch.div(simplex_key, perms, rounding_mode="floor")]
        simplex_rank = torch.div(simplex_key[:, None] % perms, (dim + 1) ** torch.arange(dim + 1, device=device),
                                 rounding_mode="floor") % (dim + 1)  # (U, d + 1)
        # Vertex r of a simplex is key_r = rem0 + r - (d + 1) [rank > d - r]: its code is
        # code(rem0) + r sum(radix) - (d + 1) (sum of the radices of the r highest-ranked coordinates).
        by_rank = torch.zeros(simplex_key.shape[0], dim + 1, dtype=torch.long, device=device)
        by_rank.scatter_(1, simplex_rank, torch.cat([radix, radix.new_zeros(1)]).expand_as(by_rank))
        top = by_rank.flip(1).cumsum(1)  # top[:, t]: sum of the radices of the t + 1 highest ranks
        top = torch.cat([top.new_zeros(top.shape[0], 1), top[:, :dim]], dim=1)
        codes = simplex_base[:, None] + torch.arange(dim + 1, device=device) * radix.sum() - (dim + 1) * top
        unique, vertex = torch.unique(codes.reshape(-1), sorted=True, return_inverse=True)
        points = unique.shape[0]
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
        self.neighbours = [(found[:, j].contiguous(), found[:, dim + 1 + j].contiguous()) for j in range(dim + 1)]
        rows_type = torch.int32 if points < 2**31 - 1 else torch.long
        self.slice_index = (vertex.reshape(-1, dim + 1) + 1).to(rows_type)[simplex_of]  # (N, d + 1)
        self.alpha = 1.0 / (1.0 + 2.0 ** (-dim))
        # Symmetric normalisation n = (K 1)^-1/2, folded into the weights: K~ v = n * slice(blur(splat(n * v))).
        ones = torch.zeros(points + 1, dtype=torch.float32, device=device)
        ones.index_add_(0, self.slice_index.reshape(-1), weights.reshape(-1))
        degree = (self._blur(ones[:, None])[:, 0][self.slice_index] * weights).sum(dim=1, keepdim=True) * self.alpha
        self.slice_weight = weights.mul_(1.0 / torch.sqrt(degree + 1e-20))

    def _blur(self, lattice: torch.Tensor) -> torch.Tensor:
        for n1, n2 in self.neighbours:
            lattice = lattice + 0.5 * (lattice[n1] + lattice[n2])
        return lattice

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

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        """K~ @ values for values (N, C)."""
        table = values.new_zeros(self.num_points + 1, values.shape[1])
        block = max(1, SPLAT_BLOCK_ELEMENTS // max(1, (self.dim + 1) * values.shape[1]))
        for start in range(0, self.count, block):  # splat, a block of pixels at a time (bounded memory)
            stop = min(start + block, self.count)
            weighted = values[start:stop, None, :] * self.slice_weight[start:stop, :, None]  # (b, d + 1, C)
            table.index_add_(0, self.slice_index[start:stop].reshape(-1), weighted.reshape(-1, values.shape[1]))
        table = self._blur(table)
        return F.embedding_bag(self.slice_index, table * self.alpha, mode="sum",
                               per_sample_weights=self.slice_weight)


class PixelTiles:
    """The pixels of an H x W image in tile order: tiles of `tile` = (rows, columns) in raster order, the pixels of
    each tile in raster order. The lattice mean field runs a tile at a time: a tile's pixels touch few lattice
    points, so the rows it reads and writes stay in the cache.

    Attributes: `order` (N,), the raster index of the pixel at each position; `spans`, per tile (start, stop, y0,
    y1, x0, x1): its positions start:stop and its rows and columns in the image.
    """

    def __init__(self, height: int, width: int, tile: tuple[int, int], device: torch.device | str = "cpu") -> None:
        tile_h, tile_w = max(1, min(tile[0], height)), max(1, min(tile[1], width))
        self.height, self.width = height, width
        self.spans: list[tuple[int, int, int, int, int, int]] = []
        pieces = []
        start = 0
        for y0 in range(0, height, tile_h):
            y1 = min(y0 + tile_h, height)
            for x0 in range(0, width, tile_w):
                x1 = min(x0 + tile_w, width)
                stop = start + (y1 - y0) * (x1 - x0)
                self.spans.append((start, stop, y0, y1, x0, x1))
                pieces.append((torch.arange(y0, y1)[:, None] * width + torch.arange(x0, x1)[None, :]).reshape(-1))
                start = stop
        self.order = torch.cat(pieces).to(device)
        self.count = height * width


def _bag_offsets(sizes: torch.Tensor) -> torch.Tensor:
    """`embedding_bag` offsets (where each bag's entries start) of bags with these numbers of entries."""
    return torch.cumsum(sizes, 0) - sizes


def _balanced_bag_order(sizes: torch.Tensor, threads: int) -> torch.Tensor:
    """An order of bags (sizes: entries per bag) for `embedding_bag` on `threads` threads, which split the bags
    into equal runs by count: the bags are dealt by size, largest first, to the threads in snake order (0..T-1,
    T-1..0, ...), and each thread's bags keep their original order. A tile's bilateral bags (hundreds of entries
    each) sit after its Gaussian ones (a few dozen), so in row order one thread would get most of the work."""
    count = sizes.shape[0]
    by_size = torch.argsort(sizes, descending=True, stable=True)
    lane = torch.arange(count, device=sizes.device) % (2 * threads)
    lane = torch.where(lane < threads, lane, 2 * threads - 1 - lane)
    group = torch.empty_like(lane)
    group[by_size] = lane
    return torch.argsort(group * count + torch.arange(count, device=sizes.device))


class CombinedLatticeMessages:
    """sum_m w_m K~_m v for several permutohedral kernels built on the pixels in `tiles` order.

    The lattices' rows are stacked into one table (each lattice keeps its own zero row). Per tile, the slice is one
    `embedding_bag` that sums (d_1 + 1) + (d_2 + 1) + ... table rows per pixel, with the Potts weights and
    pydensecrf's constants folded into its weights, plus the pixel's own -unary row (weight 1), so that it gives
    the pixel's energy; the splat of the tile's Q is one `embedding_bag` with a bag per table row that the tile
    touches (its pixels in order), added into the next table with `index_add_`. The blur is, per lattice direction
    and block of rows, one `embedding_bag` whose bag for a row is the row (weight 1) and its two neighbours along
    that direction (weight 1/2 each, missing ones left out). Same result as applying the kernels one by one (up to
    float summation order).
    """

    def __init__(self, kernels: list[tuple[float, PermutohedralKernel]], tiles: PixelTiles,
                 threads: int | None = None) -> None:
        count = tiles.count
        device = kernels[0][1].slice_index.device
        if threads is None:  # the threads that will share each splat (`_balanced_bag_order`)
            threads = torch.get_num_threads() if device.type == "cpu" else 1
        vertices = sum(kernel.dim + 1 for _, kernel in kernels)
        rows = sum(kernel.num_points + 1 for _, kernel in kernels)
        self.rows = rows
        # Indices in int32 where they fit (embedding_bag takes either; half the memory).
        small = torch.int32 if rows + count < 2**31 else torch.long
        self.slice_index = torch.empty(count, vertices + 1, dtype=small, device=device)
        self.slice_weight = torch.empty(count, vertices + 1, dtype=torch.float32, device=device)
        splat_weight = torch.empty(count, vertices, dtype=torch.float32, device=device)
        self.parts = []
        row = column = 0
        for weight, kernel in kernels:
            if kernel.count != count:
                raise ValueError(f"a kernel has {kernel.count} pixels but the tiles have {count}")
            columns = slice(column, column + kernel.dim + 1)
            torch.add(kernel.slice_index, row, out=self.slice_index[:, columns])
            torch.mul(kernel.slice_weight, weight * kernel.alpha, out=self.slice_weight[:, columns])
            splat_weight[:, columns] = kernel.slice_weight
            steps = [self._blur_blocks(kernel, direction) for direction in range(kernel.dim + 1)]
            self.parts.append((row, kernel.num_points + 1, steps))
            row += kernel.num_points + 1
            column += kernel.dim + 1
        torch.add(tiles.order, rows, out=self.slice_index[:, vertices])  # each pixel's -unary row (raster order)
        self.slice_weight[:, vertices] = 1.0
        # Splat bags per tile: a bag per table row the tile touches, holding the tile's entries (position, vertex)
        # of that row, positions in order; the bags in row order, or with several threads in the balanced order
        # of `_balanced_bag_order`.
        self.splats = []  # per tile: (positions within the tile, weights, bag offsets, table rows of the bags)
        for start, stop, *_ in tiles.spans:
            rows_in_tile, entry = torch.sort(self.slice_index[start:stop, :vertices].reshape(-1), stable=True)
            bag_rows, per_bag = torch.unique_consecutive(rows_in_tile, return_counts=True)
            offsets = _bag_offsets(per_bag)
            if threads > 1:
                order = _balanced_bag_order(per_bag, threads)
                bag_rows, per_bag, old_offsets = bag_rows[order], per_bag[order], offsets[order]
                offsets = _bag_offsets(per_bag)
                entry = entry[torch.repeat_interleave(old_offsets - offsets, per_bag)
                              + torch.arange(entry.numel(), device=device)]
            offsets = offsets.to(small)
            positions = torch.div(entry, vertices, rounding_mode="floor").to(small)
            self.splats.append((positions, splat_weight[start:stop].reshape(-1).index_select(0, entry), offsets,
                                bag_rows))

    @staticmethod
    def _blur_blocks(kernel: PermutohedralKernel, direction: int) -> list[tuple]:
        """The blur bags of one direction in blocks of `BLUR_BLOCK_ROWS` rows: (first row, end row, index,
        offsets, weights) per block."""
        bag, per_row, bag_weight = kernel.blur_bags(direction)
        starts = list(range(0, kernel.num_points + 1, BLUR_BLOCK_ROWS))
        ends = starts[1:] + [kernel.num_points + 1]
        entry_ends = torch.cumsum(per_row, 0)[torch.tensor(ends, device=per_row.device) - 1].tolist()
        blocks = []
        for r0, r1, e0, e1 in zip(starts, ends, [0] + entry_ends[:-1], entry_ends):
            offsets = _bag_offsets(per_row[r0:r1])
            blocks.append((r0, r1, bag[e0:e1], offsets, bag_weight[e0:e1]))
        return blocks

    def blur_into(self, table: torch.Tensor, out: torch.Tensor) -> None:
        """Blur the splatted table (rows, C) along every lattice direction into out[:rows]; `table` is used as
        working space. The directions go back and forth between the two arrays, a block of rows at a time (no
        table-sized temporaries)."""
        for start, rows, steps in self.parts:
            source, target = table[start : start + rows], out[start : start + rows]
            for blocks in steps:
                for r0, r1, index, offsets, weights in blocks:
                    target[r0:r1] = F.embedding_bag(index, source, offsets, mode="sum", per_sample_weights=weights)
                source, target = target, source
            if len(steps) % 2 == 0:  # the last direction wrote into `table`
                out[start : start + rows] = table[start : start + rows]


TRANSPOSE_BLOCK = 8  # columns per block of the two-step (K, h, w) -> (h, w, K) tile copy


def _tile_to_rows(probs: torch.Tensor, y0: int, y1: int, x0: int, x1: int, out: torch.Tensor) -> None:
    """out (h, w, K) = probs[:, y0:y1, x0:x1] with the classes last, in two steps that each move contiguous runs:
    (K, h, w / B, B) -> (h, w / B, K, B), then a transpose of each (K, B) block (which is in the cache), B =
    `TRANSPOSE_BLOCK`; columns beyond the last whole block are copied directly."""
    classes = probs.shape[0]
    height, width = y1 - y0, x1 - x0
    main = width - width % TRANSPOSE_BLOCK
    if main:
        blocks = main // TRANSPOSE_BLOCK
        staged = torch.empty(height, blocks, classes, TRANSPOSE_BLOCK, dtype=probs.dtype, device=probs.device)
        staged.copy_(probs[:, y0:y1, x0 : x0 + main].reshape(classes, height, blocks, TRANSPOSE_BLOCK)
                     .permute(1, 2, 0, 3))
        out[:, :main].view(height, blocks, TRANSPOSE_BLOCK, classes).copy_(staged.transpose(2, 3))
    if main < width:
        out[:, main:].copy_(probs[:, y0:y1, x0 + main : x1].permute(1, 2, 0))


def lattice_mean_field(probs: torch.Tensor, messages: CombinedLatticeMessages, tiles: PixelTiles,
                       iterations: int) -> torch.Tensor:
    """`mean_field` for lattice messages, from class probabilities (K, H, W) to Q (K, H, W), a tile at a time.

    One (rows + N, K) array holds the blurred lattice table and, below it, -unary = log(clip(P)) of the pixels in
    raster order, so one `embedding_bag` gives a tile's energies (`CombinedLatticeMessages`). The first pass writes
    a tile's -unary rows and splats its Q0 = clip(P) / sum(clip(P)) (= softmax(-unary)); each further pass
    computes a tile's energies from the current table, its Q (softmax) into a tile-sized buffer, and splats that Q
    into the next table; between passes the next table is blurred into the array. The last pass writes Q over the
    tile's -unary rows (no other tile reads them), and the result is those rows seen as (K, H, W): a view with the
    classes innermost in memory (strides (1, W K, K)), not a copy (it keeps the table's rows, a few percent more,
    alive with it). Same result as `mean_field` up to float summation order.
    """
    classes = probs.shape[0]
    device = probs.device
    rows = messages.rows
    store = torch.empty(rows + tiles.count, classes, dtype=torch.float32, device=device)
    table = torch.empty(rows, classes, dtype=torch.float32, device=device)
    unary = store[rows:].view(tiles.height, tiles.width, classes)  # (H, W, K), raster order
    largest = max(stop - start for start, stop, *_ in tiles.spans)
    q = torch.empty(largest, classes, dtype=torch.float32, device=device)
    for step in range(iterations + 1):
        last = step == iterations
        if not last:
            table.zero_()
        for (start, stop, y0, y1, x0, x1), splat in zip(tiles.spans, messages.splats):
            tile_q = q[: stop - start]
            if step == 0:  # clip(P) into the tile's -unary rows, Q0 from it, then the log in place
                clipped = unary[y0:y1, x0:x1]
                _tile_to_rows(probs, y0, y1, x0, x1, clipped)
                clipped.clamp_(UNARY_CLIP, 1.0)
                torch.div(clipped, clipped.sum(dim=2, keepdim=True), out=tile_q.view(y1 - y0, x1 - x0, classes))
                clipped.log_()
            else:
                energy = F.embedding_bag(messages.slice_index[start:stop], store, mode="sum",
                                         per_sample_weights=messages.slice_weight[start:stop])
                torch.softmax(energy, dim=1, out=tile_q)
            if last:
                unary[y0:y1, x0:x1] = tile_q.view(y1 - y0, x1 - x0, classes)
            else:
                positions, weights, offsets, table_rows = splat
                table.index_add_(0, table_rows, F.embedding_bag(positions, tile_q, offsets, mode="sum",
                                                                per_sample_weights=weights))
        if not last:
            messages.blur_into(table, store)
    return unary.permute(2, 0, 1)


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
        array for a numpy input. The lattice backend returns a (H, W, K) buffer seen as (K, H, W) (the classes
        innermost in memory, as in `torch.channels_last`); `.contiguous()` or `np.ascontiguousarray` gives class
        planes.
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
        # The lattice runs on the pixels in tile order (`PixelTiles`); its kernels are built on features in that
        # order, the exact ones on features in raster order.
        lattice = backend == "lattice"
        tiles = order = None
        if lattice:
            tiles = PixelTiles(height, width, LATTICE_TILE if device.type == "cpu" else (height, width), device)
            order = tiles.order
        make = KERNELS[backend]
        kernels = []
        if gaussian_compat > 0 and iterations > 0:
            positions = gaussian_features(height, width, float(gaussian_sxy), device)
            kernels.append((float(gaussian_compat), make(positions if order is None else positions[order])))
        if bilateral_compat > 0 and iterations > 0:
            features = bilateral_features(rgb, float(bilateral_sxy), float(bilateral_srgb))
            kernels.append((float(bilateral_compat), make(features if order is None else features[order])))
        if lattice and kernels:
            out = lattice_mean_field(tensor.float(), CombinedLatticeMessages(kernels, tiles), tiles,
                                     int(iterations))
        else:
            log_probs = torch.log_(tensor.float().clamp(UNARY_CLIP, 1.0)).reshape(classes, -1).T  # -unary, (N, K)
            q = mean_field(log_probs.neg().contiguous(), kernels, int(iterations))
            out = torch.empty(classes, height * width, dtype=torch.float32, device=device)
            out.copy_(q.T)  # one 2-D transposing copy (much faster than .contiguous() of the 3-D view)
            out = out.reshape(classes, height, width)
    return out.cpu().numpy() if as_numpy else out
