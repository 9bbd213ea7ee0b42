"""Mask sources (superpixels, folder, SAM and SAM 2 on tiny random models), the disk cache, checkpoints and errors."""

from __future__ import annotations

import io
import json
import sys
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from itaclip_core.masks import MaskCache, MaskError, build_mask_source, generator_config, read_mask_file
from itaclip_core.masks.checkpoints import CheckpointEntry, fetch_checkpoint
from itaclip_core.masks.extras import ExtraNotInstalledError
from itaclip_core.model import weights
from itaclip_core.model.checkpoint import CheckpointError

TINY_ARGS = ("points_per_side=4", "pred_iou_thresh=0", "stability_score_thresh=0")


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    out = np.zeros((48, 64, 3), dtype=np.uint8)
    out[:, :32] = (200, 40, 40)
    out[:, 32:] = (40, 40, 200)
    return np.clip(out + rng.integers(0, 10, out.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("algorithm", ["slic", "felzenszwalb"])
def test_superpixels_partition_the_whole_image(image, algorithm):
    masks = build_mask_source("superpixels", generator=algorithm).generate(image)
    assert masks.size == (48, 64) and len(masks) >= 2
    assert (masks.masks.sum(axis=0) == 1).all()  # a partition: every pixel in exactly one superpixel
    # The colour edge at column 32 is respected: at most 3% of the pixels lie in a superpixel's minority side.
    left = masks.masks[:, :, :32].sum(axis=(1, 2))
    right = masks.masks[:, :, 32:].sum(axis=(1, 2))
    assert np.minimum(left, right).sum() <= 0.03 * image.shape[0] * image.shape[1]


def test_generator_presets_and_overrides():
    config = generator_config("corrclip_8", ["points_per_side=16", "multimask_output=true"])
    assert (config.points_per_side, config.pred_iou_thresh, config.multimask_output) == (16, 0.4, True)
    assert generator_config("corrclip_8").apply_postprocessing is False
    with pytest.raises(MaskError, match="unknown mask generator setting 'points'"):
        generator_config("corrclip_8", ["points=3"])
    with pytest.raises(MaskError, match="available"):
        generator_config("nope")
    with pytest.raises(MaskError, match="SuperpixelConfig"):
        build_mask_source("superpixels", generator="corrclip_8")
    with pytest.raises(MaskError, match="unknown mask source 'foo'"):
        build_mask_source("foo")


def test_folder_source_reads_png_label_maps_and_npz_masks(tmp_path, image):
    labels = np.zeros((48, 64), dtype=np.uint8)
    labels[:10, :10] = 1
    labels[20:, 30:] = 7
    Image.fromarray(labels).save(tmp_path / "a.png")
    boolean = np.zeros((3, 48, 64), dtype=bool)
    boolean[0, :5] = True
    boolean[2] = True
    np.savez(tmp_path / "b.npz", masks=boolean)
    source = build_mask_source(str(tmp_path))
    from_png = source.generate(image, "dir/a.jpg")
    assert len(from_png) == 2 and from_png.masks[0].sum() == 100 and from_png.masks[1].sum() == 28 * 34
    from_npz = source.generate(image, "b.jpg")
    assert np.array_equal(from_npz.masks, boolean)
    with pytest.raises(MaskError, match="no masks for image 'c.jpg'.*c.png.*c.npz"):
        source.generate(image, "c.jpg")
    Image.fromarray(labels[:40]).save(tmp_path / "small.png")
    with pytest.raises(MaskError, match="40x64.*image is 48x64"):
        source.generate(image, "small.jpg")
    (tmp_path / "torn.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(MaskError, match="could not be read"):
        read_mask_file(tmp_path / "torn.npz")
    Image.fromarray(np.zeros((48, 64), dtype=np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(MaskError, match="empty"):
        source.generate(image, "empty.jpg")
    with pytest.raises(MaskError, match="does not exist"):
        build_mask_source(f"folder:{tmp_path / 'missing'}")


class _Counting:
    """Wraps a source and counts generations."""

    def __init__(self, source):
        self.source = source
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.source, name)

    def generate(self, image, name=None):
        self.calls += 1
        return self.source.generate(image, name)


def test_cache_generates_once_regenerates_on_changes_and_torn_files(tmp_path, image):
    source = _Counting(build_mask_source("superpixels"))
    cache = MaskCache(source, tmp_path)
    first = cache.get(image)
    second = cache.get(image)
    assert source.calls == 1 and cache.generated == 1 and cache.loaded == 1
    assert np.array_equal(first.masks, second.masks)
    other = image.copy()
    other[0, 0] = 0
    cache.get(other)  # a different image: generated
    assert source.calls == 2
    changed = _Counting(build_mask_source("superpixels", generator_args=["n_segments=10"]))
    MaskCache(changed, tmp_path).get(image)  # a changed setting: generated again
    assert changed.calls == 1
    cache.path(image).write_bytes(cache.path(image).read_bytes()[:40])  # torn file
    again = cache.get(image)
    assert source.calls == 3 and np.array_equal(again.masks, first.masks)
    assert cache.get(image) is not None and source.calls == 3  # rewritten whole


def test_cache_keeps_an_empty_mask_set(tmp_path):
    from itaclip_core.masks import MaskSet
    from itaclip_core.masks.cache import load_mask_set, save_mask_set

    save_mask_set(tmp_path / "empty.npz", MaskSet(np.zeros((0, 5, 7), dtype=bool)))
    loaded = load_mask_set(tmp_path / "empty.npz")
    assert loaded is not None and loaded.masks.shape == (0, 5, 7) and loaded.scores is None


def test_sam_end_to_end_on_a_tiny_random_model(image, tmp_path):
    pytest.importorskip("segment_anything", reason="the sam extra (segment-anything) is not installed")
    source = build_mask_source("sam", checkpoint="random-tiny", generator_args=TINY_ARGS, device="cpu")
    masks = source.generate(image)
    assert masks.size == (48, 64) and masks.masks.dtype == np.bool_
    assert masks.scores is not None and masks.scores.shape == (len(masks),)
    assert source.settings()["model"] == "random-tiny:0"
    with pytest.raises(MaskError, match="SAM 2 setting"):
        build_mask_source("sam", generator="corrclip_8")


def test_sam2_end_to_end_on_a_tiny_random_model(image):
    pytest.importorskip("sam2", reason="the sam2 extra (sam2, hydra-core, iopath) is not installed")
    source = build_mask_source("sam2", generator="corrclip_8", generator_args=TINY_ARGS[1:],
                               checkpoint="random-tiny:1", device="cpu")
    masks = source.generate(image)
    assert masks.size == (48, 64) and masks.masks.dtype == np.bool_
    assert masks.scores is not None and masks.scores.shape == (len(masks),)


def test_checkpoint_of_the_wrong_model_type_is_refused(tmp_path):
    pytest.importorskip("segment_anything", reason="the sam extra (segment-anything) is not installed")
    pytest.importorskip("sam2", reason="the sam2 extra is not installed")
    large = tmp_path / "large.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1, 4, 4, 1024)}, large)
    with pytest.raises(CheckpointError, match=r"SAM checkpoint \(vit_l\).*set mask_model=vit_l"):
        build_mask_source("sam", checkpoint=large, model="vit_b").build_model()
    sam2_state = {"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(96, 3, 7, 7),
                  "no_obj_embed_spatial": torch.zeros(1, 64)}
    sam2_state.update({f"image_encoder.trunk.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(12)})
    sam2_file = tmp_path / "sam2.pt"
    torch.save({"model": sam2_state}, sam2_file)
    with pytest.raises(CheckpointError, match=r"SAM 2 checkpoint \(sam2.1_hiera_t\).*masks=sam2"):
        build_mask_source("sam", checkpoint=sam2_file).build_model()
    with pytest.raises(CheckpointError, match=r"sam2.1_hiera_t.*set mask_model=sam2.1_hiera_t"):
        build_mask_source("sam2", checkpoint=sam2_file, model="sam2.1_hiera_l").build_model()
    with pytest.raises(CheckpointError, match="SAM checkpoint.*masks=sam"):
        build_mask_source("sam2", checkpoint=large).build_model()
    with pytest.raises(CheckpointError, match="not found"):
        build_mask_source("sam", checkpoint=tmp_path / "none.pth").build_model()
    with pytest.raises(MaskError, match="vit_b, vit_l, vit_h"):
        build_mask_source("sam", model="vit_x")


def test_missing_extra_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "segment_anything", None)
    monkeypatch.setitem(sys.modules, "sam2", None)
    with pytest.raises(ExtraNotInstalledError, match=r"pip install 'itaclip-core\[sam\]'"):
        build_mask_source("sam")
    with pytest.raises(ExtraNotInstalledError, match=r"itaclip-core\[sam2\]"):
        build_mask_source("sam2")


class _Response(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_checkpoint_download_records_size_and_sha_and_checks_them(tmp_path, monkeypatch):
    entry = CheckpointEntry("https://example.invalid/model.pt", "model.pt")
    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        return _Response(b"weights" * 100)

    monkeypatch.setattr(weights, "urlopen", fake_urlopen)
    path = fetch_checkpoint(entry, tmp_path, progress=False)
    record = json.loads((tmp_path / "model.pt.recorded.json").read_text())
    assert path.read_bytes() == b"weights" * 100 and record["size"] == 700 and len(record["sha256"]) == 64
    assert fetch_checkpoint(entry, tmp_path, progress=False) == path and len(calls) == 1  # no second download
    path.write_bytes(b"other" * 140)  # same size, other content
    with pytest.raises(weights.ChecksumError, match="not the file recorded"):
        fetch_checkpoint(entry, tmp_path, progress=False)

    def offline(url, timeout=None):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(weights, "urlopen", offline)
    with pytest.raises(weights.WeightsUnavailableError, match=r"(?s)example.invalid/model.pt.*put it at .*other.pt"):
        fetch_checkpoint(CheckpointEntry("https://example.invalid/model.pt", "other.pt"), tmp_path, progress=False)
    assert not (tmp_path / "other.pt").exists() and not list(tmp_path.glob(".*.part"))
