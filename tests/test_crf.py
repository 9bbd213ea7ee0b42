"""DenseCRF: the exact path against a literal mean field written here, the lattice against the exact path and
against pydensecrf2 (when installed), the settings' errors, and CPU/GPU agreement."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from itaclip_core.refinement import dense_crf
from itaclip_core.refinement.crf import CRFSettingError


def _literal_mean_field(probs: np.ndarray, image: np.ndarray, iterations: int, gsxy: float, gw: float, bsxy: float,
                        bsrgb: float, bw: float) -> np.ndarray:
    """pydensecrf's model written out in float64 with dense N x N kernels."""
    classes, height, width = probs.shape
    ys, xs = np.mgrid[0:height, 0:width]
    pos = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float64)
    rgb = image.reshape(-1, 3).astype(np.float64)
    kernels = []
    for weight, feats in ((gw, pos / gsxy), (bw, np.concatenate([pos / bsxy, rgb / bsrgb], axis=1))):
        diff = feats[:, None, :] - feats[None, :, :]
        kernel = np.exp(-0.5 * (diff**2).sum(-1))  # (N, N), self term included
        degree = kernel.sum(1)
        kernels.append((weight, kernel / np.sqrt(degree[:, None] * degree[None, :])))
    unary = -np.log(np.clip(probs.reshape(classes, -1), 1e-5, 1.0))  # (K, N)

    def softmax(x):
        e = np.exp(x - x.max(0, keepdims=True))
        return e / e.sum(0, keepdims=True)

    q = softmax(-unary)
    for _ in range(iterations):
        energy = -unary + sum(w * (k @ q.T).T for w, k in kernels)
        q = softmax(energy)
    return q.reshape(classes, height, width)


def _random_probs(rng: np.random.Generator, classes: int, height: int, width: int, scale: float = 2.0) -> np.ndarray:
    logits = rng.normal(0, scale, (classes, height, width))
    p = np.exp(logits - logits.max(0))
    return (p / p.sum(0)).astype(np.float32)


def _structured(rng: np.random.Generator, height: int, width: int, classes: int = 4, noise: float = 0.8):
    """Blocky colour image and noisy probabilities that favour the block labels."""
    labels = np.zeros((height, width), np.int64)
    labels[:, width // 3 :] = 1
    labels[height // 2 :, 2 * width // 3 :] = 2
    labels[: height // 3, : width // 4] = 3 % classes
    colours = np.array([(200, 40, 40), (40, 180, 40), (40, 40, 200), (220, 220, 60), (120, 120, 120)])[:classes]
    image = colours[labels] + rng.integers(-12, 13, (height, width, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    logits = 2.0 * np.eye(classes)[labels].transpose(2, 0, 1) + rng.normal(0, noise, (classes, height, width))
    p = np.exp(logits - logits.max(0))
    return (p / p.sum(0)).astype(np.float32), image


@pytest.mark.parametrize("iterations", [0, 1, 5])
def test_exact_path_equals_a_literal_mean_field(iterations):
    rng = np.random.default_rng(iterations)
    probs = _random_probs(rng, 3, 6, 7)
    probs[0, 0, 0] = 0.0  # exercises the 1e-5 clip
    image = rng.integers(0, 256, (6, 7, 3)).astype(np.uint8)
    settings = dict(gaussian_sxy=1.5, gaussian_compat=3.0, bilateral_sxy=4.0, bilateral_srgb=40.0,
                    bilateral_compat=5.0)
    out = dense_crf(probs, image, iterations=iterations, backend="exact", **settings)
    expected = _literal_mean_field(probs, image, iterations, 1.5, 3.0, 4.0, 40.0, 5.0)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == probs.shape
    assert np.abs(out - expected).max() < 1e-5
    if iterations:
        assert np.abs(out - probs).max() > 1e-2  # the messages did something


def test_exact_path_with_default_settings_and_a_tensor_input():
    rng = np.random.default_rng(3)
    probs, image = _structured(rng, 10, 12)
    out = dense_crf(torch.from_numpy(probs), torch.from_numpy(image), backend="exact")
    expected = _literal_mean_field(probs, image, 10, 3.0, 3.0, 80.0, 13.0, 10.0)
    assert torch.is_tensor(out) and out.dtype == torch.float32
    assert np.abs(out.numpy() - expected).max() < 1e-5
    torch.testing.assert_close(out.sum(0), torch.ones(10, 12), atol=1e-5, rtol=0)


def test_a_zero_weight_leaves_its_kernel_out():
    rng = np.random.default_rng(4)
    probs, image = _structured(rng, 8, 9)
    out = dense_crf(probs, image, iterations=3, bilateral_compat=0.0, backend="exact")
    expected = _literal_mean_field(probs, image, 3, 3.0, 3.0, 80.0, 13.0, 0.0)
    assert np.abs(out - expected).max() < 1e-5


@pytest.mark.parametrize("seed", [0, 1])
def test_lattice_agrees_with_the_exact_path_on_structured_images(seed):
    rng = np.random.default_rng(seed)
    probs, image = _structured(rng, 40, 52)
    exact = dense_crf(probs, image, backend="exact")
    lattice = dense_crf(probs, image, backend="lattice")
    assert (exact.argmax(0) == lattice.argmax(0)).mean() >= 0.99
    assert np.abs(exact - lattice).mean() < 1e-2
    assert (lattice.argmax(0) != probs.argmax(0)).any()  # the CRF changed labels


def _natural_like(rng: np.random.Generator, height: int, width: int, classes: int):
    """Smooth shapes with gradients and texture, and coarse probabilities upsampled from a small grid."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    labels = ((np.sin(xs / 9.0) + np.cos(ys / 7.0) + xs / width) * classes / 3.0).astype(np.int64) % classes
    colours = rng.integers(0, 256, (classes, 3)).astype(np.float64)
    image = colours[labels] + 20 * np.sin(xs / 5.0)[..., None] + rng.normal(0, 6, (height, width, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    small = rng.normal(0, 1.0, (classes, height // 8, width // 8))
    coarse = torch.nn.functional.interpolate(torch.from_numpy(small)[None], size=(height, width), mode="bilinear")
    logits = 1.5 * np.eye(classes)[labels].transpose(2, 0, 1) + coarse[0].numpy()
    p = np.exp(logits - logits.max(0))
    return (p / p.sum(0)).astype(np.float32), image


@pytest.mark.parametrize("case", ["blocks", "natural"])
def test_agreement_with_pydensecrf2(case):
    pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 (extra crf) is not installed")
    rng = np.random.default_rng(7)
    if case == "blocks":
        probs, image = _structured(rng, 48, 64)
    else:
        probs, image = _natural_like(rng, 48, 64, 5)
    reference = dense_crf(probs, image, backend="pydensecrf2")
    assert isinstance(reference, np.ndarray) and reference.shape == probs.shape
    lattice = dense_crf(probs, image, backend="lattice")
    exact = dense_crf(probs, image, backend="exact")
    assert (lattice.argmax(0) == reference.argmax(0)).mean() >= 0.99
    assert (exact.argmax(0) == reference.argmax(0)).mean() == 1.0
    assert (reference.argmax(0) != probs.argmax(0)).any()


def test_pydensecrf2_backend_against_the_package_called_directly():
    dcrf = pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 (extra crf) is not installed")
    rng = np.random.default_rng(8)
    probs, image = _structured(rng, 20, 30)
    crf = dcrf.DenseCRF2D(30, 20, 4)
    crf.setUnaryEnergy(np.ascontiguousarray(-np.log(np.clip(probs, 1e-5, 1)).reshape(4, -1)))
    crf.addPairwiseGaussian(sxy=2.0, compat=1.0)
    crf.addPairwiseBilateral(sxy=30.0, srgb=20.0, rgbim=image, compat=4.0)
    expected = np.array(crf.inference(4)).reshape(4, 20, 30)
    out = dense_crf(probs, image, iterations=4, gaussian_sxy=2.0, gaussian_compat=1.0, bilateral_sxy=30.0,
                    bilateral_srgb=20.0, bilateral_compat=4.0, backend="pydensecrf2")
    assert np.abs(out - expected).max() < 1e-6
    lattice = dense_crf(probs, image, iterations=4, gaussian_sxy=2.0, gaussian_compat=1.0, bilateral_sxy=30.0,
                        bilateral_srgb=20.0, bilateral_compat=4.0)
    assert (lattice.argmax(0) == expected.argmax(0)).mean() >= 0.99


def test_zero_iterations_is_the_clipped_renormalised_input():
    rng = np.random.default_rng(9)
    probs = _random_probs(rng, 4, 5, 6, scale=6.0)
    out = dense_crf(probs, np.zeros((5, 6, 3), np.uint8), iterations=0)
    clipped = np.clip(probs, 1e-5, 1.0)
    assert np.abs(out - clipped / clipped.sum(0)).max() < 1e-6


@pytest.mark.parametrize(
    "changes, word",
    [
        (dict(iterations=-1), "iterations"),
        (dict(iterations=2.5), "iterations"),
        (dict(gaussian_sxy=0.0), "gaussian_sxy"),
        (dict(bilateral_sxy=-3.0), "bilateral_sxy"),
        (dict(bilateral_srgb=math.nan), "bilateral_srgb"),
        (dict(gaussian_compat=-1.0), "gaussian_compat"),
        (dict(bilateral_compat=math.inf), "bilateral_compat"),
        (dict(backend="densecrf"), "backend"),
    ],
)
def test_out_of_range_settings_are_named(changes, word):
    probs = np.full((2, 4, 4), 0.5, np.float32)
    with pytest.raises(CRFSettingError, match=word):
        dense_crf(probs, np.zeros((4, 4, 3), np.uint8), **changes)


def test_bad_inputs_are_explained():
    probs = np.full((2, 4, 4), 0.5, np.float32)
    with pytest.raises(CRFSettingError, match="uint8"):
        dense_crf(probs, np.zeros((4, 4, 3), np.float32))
    with pytest.raises(CRFSettingError, match="same size"):
        dense_crf(probs, np.zeros((4, 5, 3), np.uint8))
    with pytest.raises(CRFSettingError, match=r"\(K, H, W\)"):
        dense_crf(probs[0], np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(CRFSettingError, match="NaN"):
        dense_crf(np.full((2, 4, 4), np.nan, np.float32), np.zeros((4, 4, 3), np.uint8))


def test_missing_pydensecrf2_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("pydensecrf"):
            raise ImportError("no pydensecrf")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"itaclip-core\[crf\]"):
        dense_crf(np.full((2, 4, 4), 0.5, np.float32), np.zeros((4, 4, 3), np.uint8), backend="pydensecrf2")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["lattice", "exact"])
def test_gpu_matches_cpu(backend):
    rng = np.random.default_rng(10)
    probs, image = _natural_like(rng, 40, 56, 5)
    cpu = dense_crf(torch.from_numpy(probs), image, backend=backend)
    gpu = dense_crf(torch.from_numpy(probs).cuda(), image, backend=backend)
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() - cpu).abs().max() < 1e-4
    assert (gpu.cpu().argmax(0) == cpu.argmax(0)).float().mean() >= 0.999


def test_exact_block_path_equals_the_cached_matrix(monkeypatch):
    from itaclip_core.refinement import crf

    rng = np.random.default_rng(11)
    probs, image = _structured(rng, 9, 11)
    cached = dense_crf(probs, image, iterations=3, backend="exact")
    monkeypatch.setattr(crf, "EXACT_CACHE_ELEMENTS", 0)
    monkeypatch.setattr(crf, "EXACT_BLOCK_ELEMENTS", 7 * 99)  # 7 rows per block: blocks end mid-image
    blocked = dense_crf(probs, image, iterations=3, backend="exact")
    assert np.abs(blocked - cached).max() < 1e-6


def _lattice_problem(seed: int, tile: tuple[int, int]):
    """A 24 x 40 natural-like image and 4 classes: the Gaussian and bilateral lattice kernels on the pixels in
    raster order and in the order of `tile`-sized tiles, and the tiles."""
    from itaclip_core.refinement import crf

    probs, image = _natural_like(np.random.default_rng(seed), 24, 40, 4)
    tiles = crf.PixelTiles(24, 40, tile)
    features = [(3.0, crf.gaussian_features(24, 40, 3.0)),
                (10.0, crf.bilateral_features(torch.from_numpy(image), 80.0, 13.0))]
    raster = [(weight, crf.PermutohedralKernel(f)) for weight, f in features]
    tiled = [(weight, crf.PermutohedralKernel(f[tiles.order])) for weight, f in features]
    return torch.from_numpy(probs), raster, tiled, tiles


@pytest.mark.parametrize("tile", [(5, 7), (6, 13), (24, 40), (64, 128)])
def test_tiled_lattice_mean_field_equals_the_plain_one(tile):
    """Tiles that end mid-row and mid-column (5 x 7: the last ones are 4 x 5; 6 x 13: one whole block of
    `TRANSPOSE_BLOCK` columns and a remainder), one tile, one tile larger than the image: the same Q as the plain
    mean field over the kernels applied one by one. The result is a view with the classes innermost."""
    from itaclip_core.refinement import crf

    probs, raster, tiled, tiles = _lattice_problem(12, tile)
    unary = -torch.log(probs.clamp(1e-5, 1)).reshape(4, -1).T.contiguous()
    plain = crf.mean_field(unary, raster, 5).T.reshape(4, 24, 40)
    messages = crf.CombinedLatticeMessages(tiled, tiles)
    if tile == (5, 7):
        assert len(tiles.spans) == 5 * 6 and tiles.spans[-1][1] - tiles.spans[-1][0] == 4 * 5
        assert sum(splat[3].shape[0] for splat in messages.splats) > messages.rows  # rows shared between tiles
    tiled_q = crf.lattice_mean_field(probs, messages, tiles, 5)
    assert tiled_q.shape == (4, 24, 40) and tiled_q.stride() == (1, 40 * 4, 4)
    assert (tiled_q - plain).abs().max() < 1e-5
    assert (plain - probs.clamp(1e-5, 1) / probs.clamp(1e-5, 1).sum(0)).abs().max() > 1e-2


@pytest.mark.parametrize("width", [3, 8, 13, 24])
def test_tile_to_rows_is_the_permuted_copy(width):
    """The two-step tile copy (whole blocks of `TRANSPOSE_BLOCK` columns, then the remainder) equals the plain
    permuted copy, for tiles narrower than a block, exactly one block, blocks and a remainder, and whole blocks."""
    from itaclip_core.refinement import crf

    probs = torch.rand(5, 9, 30, generator=torch.Generator().manual_seed(width))
    out = torch.full((4, width, 5), float("nan"))
    crf._tile_to_rows(probs, 2, 6, 3, 3 + width, out)
    assert torch.equal(out, probs[:, 2:6, 3 : 3 + width].permute(1, 2, 0))


@pytest.mark.parametrize("threads", [2, 3, 4])
def test_balanced_bag_order_gives_each_thread_a_fair_share(threads):
    """Many small bags then a few large ones (a tile's Gaussian then bilateral rows): in row order the threads'
    equal runs of bags get very unequal entries; in the balanced order within 15%, each thread's bags in their original order."""
    from itaclip_core.refinement import crf

    gen = torch.Generator().manual_seed(threads)
    sizes = torch.cat([torch.randint(10, 30, (1100,), generator=gen), torch.randint(50, 2000, (120,), generator=gen)])
    order = crf._balanced_bag_order(sizes, threads)
    assert torch.equal(torch.sort(order).values, torch.arange(sizes.numel()))
    run = -(-sizes.numel() // threads)  # how the threads split the bags: equal runs by count

    def shares(ordered):
        return torch.stack([ordered[t * run : (t + 1) * run].sum() for t in range(threads)]).double()

    assert shares(sizes).max() / shares(sizes).min() > 3
    balanced = shares(sizes[order])
    assert balanced.max() / balanced.min() < 1.15
    for t in range(threads):
        piece = order[t * run : (t + 1) * run]
        assert (piece.diff() < 0).sum() <= 1  # increasing, but for where one thread's group meets the next


def test_balanced_splat_bags_give_the_same_mean_field():
    """Splat bags in the balanced order (several threads) give exactly the Q of the row order (one thread)."""
    from itaclip_core.refinement import crf

    probs, _, tiled, tiles = _lattice_problem(14, (12, 20))
    one = crf.CombinedLatticeMessages(tiled, tiles, threads=1)
    three = crf.CombinedLatticeMessages(tiled, tiles, threads=3)
    assert any(not torch.equal(a[3], b[3]) for a, b in zip(one.splats, three.splats))
    assert all(torch.all(a[3].diff() > 0) for a in one.splats)
    for a, b in zip(one.splats, three.splats):  # the same bags (row, entries) in another order
        assert torch.equal(torch.sort(a[3]).values, torch.sort(b[3]).values)
    assert torch.equal(crf.lattice_mean_field(probs, one, tiles, 4), crf.lattice_mean_field(probs, three, tiles, 4))


def test_tiled_kernels_are_the_raster_kernels_reordered():
    """A kernel built on the pixels in tile order is the raster one with its rows permuted: same lattice points
    (same rows), same weights."""
    _, raster, tiled, tiles = _lattice_problem(13, (5, 7))
    for (_, a), (_, b) in zip(raster, tiled):
        assert a.num_points == b.num_points
        assert torch.equal(a.slice_index[tiles.order], b.slice_index)
        assert (a.slice_weight[tiles.order] - b.slice_weight).abs().max() < 1e-6
        assert all(torch.equal(x, y) for pa, pb in zip(a.neighbours, b.neighbours) for x, y in zip(pa, pb))


def _literal_permutohedral(features: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, int]:
    """pydensecrf's `Permutohedral` (init as its SSE build on x86 does it, then compute with symmetric
    normalisation) written out pixel by pixel in float32, with a dict as the hash table: K~ @ values for features
    (N, d) and values (N, C), and the number of lattice points."""
    f32 = np.float32
    count, dim = features.shape
    inv_std = float(f32(np.sqrt(2.0 / 3.0) * (dim + 1)))
    scale = [f32(1.0 / np.sqrt((i + 1) * (i + 2)) * inv_std) for i in range(dim)]
    down_factor = f32(1.0 / (dim + 1))
    table: dict[tuple, int] = {}
    offsets, weights = [], []
    for n in range(count):
        elevated = [f32(0)] * (dim + 1)
        total = f32(0)
        for j in range(dim, 0, -1):
            cf = f32(features[n, j - 1] * scale[j - 1])
            elevated[j] = f32(total - f32(j * cf))
            total = f32(total + cf)
        elevated[0] = total
        rem0, plane = [], 0
        for i in range(dim + 1):
            v = int(np.rint(f32(elevated[i] * down_factor)))  # nearest, ties to even
            rem0.append(v * (dim + 1))
            plane += v
        rank = [0] * (dim + 1)
        for i in range(dim):
            for j in range(i + 1, dim + 1):
                if elevated[i] - rem0[i] < elevated[j] - rem0[j]:
                    rank[i] += 1
                else:
                    rank[j] += 1
        for i in range(dim + 1):
            rank[i] += plane
            if rank[i] < 0:
                rank[i] += dim + 1
                rem0[i] += dim + 1
            elif rank[i] > dim:
                rank[i] -= dim + 1
                rem0[i] -= dim + 1
        bary = [f32(0)] * (dim + 2)
        for i in range(dim + 1):
            v = f32(f32(elevated[i] - rem0[i]) * down_factor)
            bary[dim - rank[i]] = f32(bary[dim - rank[i]] + v)
            bary[dim - rank[i] + 1] = f32(bary[dim - rank[i] + 1] - v)
        bary[0] = f32(bary[0] + f32(1.0 + bary[dim + 1]))
        for r in range(dim + 1):
            key = tuple(rem0[i] + (r if rank[i] <= dim - r else r - dim - 1) for i in range(dim))
            offsets.append(table.setdefault(key, len(table)))
            weights.append(bary[r])
    keys = list(table)
    points = len(keys)
    offsets = np.array(offsets).reshape(count, dim + 1)
    weights = np.array(weights, np.float32).reshape(count, dim + 1)

    def neighbour(key: tuple, j: int, sign: int) -> int:
        step = [key[k] + sign for k in range(dim)]
        if j < dim:
            step[j] = key[j] - sign * dim
        return table.get(tuple(step), -1) + 1  # row 0 is the zero row

    def apply(v: np.ndarray) -> np.ndarray:
        lattice = np.zeros((points + 1, v.shape[1]), np.float32)
        for n in range(count):
            for r in range(dim + 1):
                lattice[offsets[n, r] + 1] += weights[n, r] * v[n]
        for j in range(dim + 1):
            new = lattice.copy()
            for i, key in enumerate(keys):
                sides = lattice[neighbour(key, j, 1)] + lattice[neighbour(key, j, -1)]
                new[i + 1] = lattice[i + 1] + f32(0.5) * sides
            lattice = new
        alpha = f32(1.0 / (1.0 + 2.0 ** -dim))
        return np.stack([(weights[n, :, None] * lattice[offsets[n] + 1] * alpha).sum(0) for n in range(count)])

    norm = 1.0 / np.sqrt(apply(np.ones((count, 1), np.float32)) + 1e-20)
    return norm * apply(norm * values), points


@pytest.mark.parametrize("case", ["bilateral", "grid", "ties"])
@pytest.mark.parametrize("packed", [True, False])
def test_lattice_kernel_equals_a_literal_pydensecrf_lattice(case, packed, monkeypatch):
    """The vectorised lattice (vertices found per simplex, codes in mixed radix) against pydensecrf's algorithm
    written out pixel by pixel; `packed=False` takes the path for codes too wide to pack with the rank. "ties":
    integer features, so that residuals tie and the tie rule decides the ranks."""
    from itaclip_core.refinement import crf

    if not packed:
        monkeypatch.setattr(crf, "SIMPLEX_PACK_LIMIT", 0)
    rng = np.random.default_rng(21)
    if case == "bilateral":
        _, image = _natural_like(rng, 9, 11, 3)
        features = crf.bilateral_features(torch.from_numpy(image), 4.0, 13.0)
    elif case == "grid":
        features = crf.gaussian_features(8, 12, 1.5)
    else:
        features = torch.from_numpy(rng.integers(-3, 4, (70, 3)).astype(np.float32) * 6.0)
    values = rng.normal(0, 1, (features.shape[0], 4)).astype(np.float32)
    expected, points = _literal_permutohedral(features.numpy(), values)
    kernel = crf.PermutohedralKernel(features)
    out = kernel(torch.from_numpy(values)).numpy()
    assert kernel.num_points == points > kernel.dim + 1
    assert np.abs(out - expected).max() < 1e-5


def test_lattice_matches_pydensecrf2_probabilities():
    """Not only the labels: the lattice's Q equals pydensecrf2's to float precision, because both build the same
    lattice and run the same arithmetic."""
    pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 (extra crf) is not installed")
    rng = np.random.default_rng(22)
    probs, image = _natural_like(rng, 60, 80, 6)
    reference = dense_crf(probs, image, backend="pydensecrf2")
    lattice = dense_crf(probs, image, backend="lattice")
    assert np.abs(lattice - reference).max() < 1e-4
    assert np.abs(reference - probs).max() > 0.1


def test_refinement_benchmark_runs_rounds_and_reports_the_speed_up(monkeypatch, capsys):
    """The benchmark's flow on a tiny input, its steps run in this process instead of fresh ones: every round of
    every DenseCRF step, the medians, the speed-up from the rounds' ratios and the label agreement."""
    import re

    from itaclip_core.refinement import benchmark

    def in_this_process(spec):  # as `in_fresh_process` reports a failure
        try:
            return {"step": spec["step"], **benchmark._measure(spec)}
        except Exception as error:  # noqa: BLE001
            return {"step": spec["step"], "error": f"{type(error).__name__}: {error}"}

    threads = torch.get_num_threads()
    monkeypatch.setattr(benchmark, "run_isolated", in_this_process)
    try:
        benchmark.main(["--classes", "3", "--size", "20", "28", "--iterations", "2", "--rounds", "2", "--one-thread",
                        "--skip-loftup"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for step in ("crf_lattice", "crf_lattice_1_thread"):
        assert f"{step} (round 2):" in out and re.search(rf"{step}: median [0-9.]+ s", out)
    for step in ("pamr", "guided", "joint_bilateral"):
        assert re.search(rf"{step}:\s+[0-9.]+ s", out)
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        assert "crf_pydensecrf2 (round 1): ImportError" in out
    else:
        agreement = re.search(r"crf_lattice: [0-9.]+x faster than pydensecrf2 .* label agreement ([0-9.]+)%", out)
        assert agreement and float(agreement.group(1)) >= 99.0
