"""CLIPtrase (self-correlation recalibration with patch clustering), as its official single-GPU script runs it.

Image tower (L blocks, class token first, 1-based block numbers):
- blocks 1 .. L-1 are unchanged; block L-1 also yields its "correlation" matrix
  `A = mean_heads (cos(Q_h, Q_h) + cos(K_h, K_h) + cos(V_h, V_h)) / 3`, (1 + P) x (1 + P), no softmax;
- block L attends with `softmax(s QQ^T) + softmax(s KK^T) + softmax(s VV^T)` (rows sum to 3) and keeps its
  residual and MLP; every token goes through `ln_post` and the projection.

Per window:
1. patch scores = cosine of the normalised patch tokens with the text queries, bilinear to the window size; a
   pixel's label is the class of its best query (the official VOC21 list puts 33 background words after the 20
   labels and maps any of them to the background label, which is this rule with a class file whose last line holds
   those words). Optionally (the official VOC20 setting) the scores are multiplied per query by the class token's
   scaled score.
2. `W = A[1:, 1:] - A[0, 1:]` (the class token's row taken from every row), negatives set to 0: one row per patch.
3. DBSCAN (scikit-learn, Euclidean) on the rows of W. If every patch is noise, the labels stay as they are.
4. Per cluster, the mean of its rows of W as a rows x cols map, bilinear x4, median filter of size 7 (scipy,
   mirrored borders), bilinear to the window; every pixel takes the cluster of the largest map.
5. Each cluster's region takes the most frequent label inside it (ties to the smallest label).

The official protocol resizes the short side to n (PIL bicubic), centre-crops n x n and scores that crop as one
window (`centre_crop_image`); the sliding-window protocol of the other methods runs steps 1-5 on every window,
against the labels of the stitched prediction, and each pixel takes the most frequent of its windows' votes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from itaclip_core.model.clip import VisionTransformer

# Normalisation of the official script (torchvision ToTensor + Normalize): on [0, 1] values.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MEDIAN_SIZE = 7  # the official `ratio * 2 - 1` with ratio 4
UPSAMPLE_RATIO = 4


@dataclass(frozen=True)
class CLIPtraseSettings:
    """Clustering settings; the defaults are the official n = 336 ones (n = 224: eps 0.7, min_samples 3)."""

    eps: float = 1.1  # DBSCAN neighbourhood radius
    min_samples: int = 7  # DBSCAN core-point count
    cls_weighting: bool = False  # multiply patch scores by the class token's scores (official VOC20 setting)

    def check(self) -> None:
        if not self.eps > 0:
            raise ValueError(f"cliptrase eps must be > 0; got {self.eps}")
        if self.min_samples < 1:
            raise ValueError(f"cliptrase min_samples must be >= 1; got {self.min_samples}")


def _cosine(a: torch.Tensor) -> torch.Tensor:
    unit = F.normalize(a, dim=-1)
    return unit @ unit.transpose(-1, -2)


def correlation(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Block L-1's matrix from its queries, keys and values (B, H, N, hd): head mean of the mean q/k/v cosines."""
    per_head = _cosine(q)  # (B, H, N, N); summed in place: at most two such tensors at a time
    per_head += _cosine(k)
    per_head += _cosine(v)
    return per_head.div_(3.0).sum(dim=1) / q.shape[1]


def cliptrase_tokens(
    visual: VisionTransformer, images: torch.Tensor, explicit: bool = False, with_correlation: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CLIPtrase's dense features of images (B, 3, H, W).

    Returns:
        tokens (B, 1 + P, output_dim), class token first, not normalised, and block L-1's correlation matrix
        (B, 1 + P, 1 + P) (None unless `with_correlation`).
    """
    blocks = visual.blocks
    x = visual.embed(images)
    for block in blocks[:-2]:
        x = block(x)
    penultimate = blocks[-2]
    q, k, v = penultimate.qkv(x)
    matrix = correlation(q, k, v) if with_correlation else None
    x = penultimate.attend(x, F.scaled_dot_product_attention(q, k, v))
    last = blocks[-1]
    q, k, v = last.qkv(x)
    if explicit:
        scale = q.shape[-1] ** -0.5
        attention = sum(F.softmax((a * scale) @ a.transpose(-1, -2), dim=-1) for a in (q, k, v))
        out = attention @ v
    else:
        out = sum(F.scaled_dot_product_attention(a, a, v) for a in (q, k, v))
    x = last.attend(x, out, residual=True, mlp=True)
    return visual.head(x), matrix


@torch.no_grad()
def cliptrase_attention(visual: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """CLIPtrase's last-block attention, `(softmax(s QQ^T) + softmax(s KK^T) + softmax(s VV^T)) / 3` averaged over
    heads: (B, 1 + P, 1 + P), for inspection."""
    x = visual.embed(images)
    for block in visual.blocks[:-1]:
        x = block(x)
    q, k, v = visual.blocks[-1].qkv(x)
    scale = q.shape[-1] ** -0.5
    attention = sum(F.softmax((a * scale) @ a.transpose(-1, -2), dim=-1) for a in (q, k, v)) / 3
    return attention.mean(dim=1).float()


def denoised_correlation(matrix: torch.Tensor) -> torch.Tensor:
    """`A[1:, 1:] - A[0, 1:]` with negatives set to 0: (..., 1 + P, 1 + P) -> (..., P, P)."""
    out = matrix[..., 1:, 1:] - matrix[..., :1, 1:]
    return out.clamp_min_(0.0) if out.is_contiguous() else out.clamp_min(0.0)


def cluster_patches(rows_of_w: torch.Tensor, settings: CLIPtraseSettings) -> np.ndarray:
    """DBSCAN labels (P,) int64 of the rows of W (P, P); -1 marks noise."""
    from sklearn.cluster import DBSCAN

    data = rows_of_w.detach().float().cpu().numpy()
    return DBSCAN(eps=settings.eps, min_samples=settings.min_samples).fit_predict(data).astype(np.int64)


def cluster_maps(rows_of_w: torch.Tensor, labels: np.ndarray, grid: tuple[int, int]) -> torch.Tensor | None:
    """Per cluster, the mean of its rows of W as a map, bilinear x4 and median-filtered: (K, 4 rows, 4 cols).

    None when every patch is noise.
    """
    from scipy.ndimage import median_filter

    clusters = sorted(set(labels.tolist()) - {-1})
    if not clusters:
        return None
    rows, cols = grid
    index = torch.from_numpy(labels).to(rows_of_w.device)
    means = torch.stack([rows_of_w[index == c].mean(dim=0) for c in clusters]).reshape(len(clusters), rows, cols)
    up = F.interpolate(means[None].float(), size=(UPSAMPLE_RATIO * rows, UPSAMPLE_RATIO * cols), mode="bilinear",
                       align_corners=False)[0].cpu().numpy()
    filtered = np.stack([median_filter(m, size=MEDIAN_SIZE) for m in up])
    return torch.from_numpy(filtered)


def cluster_assignment(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Cluster of every pixel of a window of `size`: argmax of the maps resized bilinearly, (h, w) int64."""
    resized = F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]
    return resized.argmax(dim=0)


def majority_vote(labels: torch.Tensor, assignment: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Each cluster's most frequent label (ties to the smallest), painted over its region: (h, w) int64."""
    flat_labels = labels.reshape(-1).long()
    flat_assign = assignment.reshape(-1).long().to(flat_labels.device)
    span = int(flat_labels.max()) + 1 if flat_labels.numel() else 1
    counts = torch.bincount(flat_assign * span + flat_labels, minlength=num_clusters * span).view(num_clusters, span)
    winners = counts.argmax(dim=1)  # first maximum: the smallest label
    present = counts.sum(dim=1) > 0
    out = flat_labels.clone()
    covered = present[flat_assign]
    out[covered] = winners[flat_assign[covered]]
    return out.view_as(labels)


def window_votes(
    rows_of_w: torch.Tensor, grid: tuple[int, int], labels: torch.Tensor, settings: CLIPtraseSettings
) -> tuple[torch.Tensor, dict[str, object]]:
    """Steps 3-5 on one window: the voted labels (h, w) of `labels` (h, w) and the discrete steps taken.

    The details dict holds `dbscan_labels` (P,), `cluster_maps` ((K, 4 rows, 4 cols) or None) and `assignment`
    ((h, w) or None).
    """
    dbscan = cluster_patches(rows_of_w, settings)
    maps = cluster_maps(rows_of_w, dbscan, grid)
    details: dict[str, object] = {"dbscan_labels": dbscan, "cluster_maps": maps, "assignment": None}
    if maps is None:
        return labels.clone(), details
    assignment = cluster_assignment(maps.to(labels.device), tuple(labels.shape))
    details["assignment"] = assignment
    return majority_vote(labels, assignment, maps.shape[0]), details


def centre_crop_image(image: Image.Image, size: int) -> Image.Image:
    """The official preprocessing: short side to `size` (PIL bicubic, long side truncated), centre crop."""
    width, height = image.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    if new_h < size or new_w < size:
        raise ValueError(f"cannot centre-crop {size}x{size} from a {new_w}x{new_h} image")
    return image.crop((left, top, left + size, top + size))


def normalise_rgb(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float32 normalised as the official script does (ToTensor, then Normalize)."""
    array = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
    values = array.float().div(255.0)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (values - mean) / std


# ------------------------------------------------------------------------------------------ windows of an image
def settings_from(config) -> CLIPtraseSettings:
    """The clustering settings of a `SegmentorConfig`, checked."""
    settings = CLIPtraseSettings(eps=config.cliptrase_eps, min_samples=config.cliptrase_min_samples,
                                 cls_weighting=config.cliptrase_cls_weighting)
    settings.check()
    return settings


@torch.no_grad()
def window_logits_and_clusters(
    visual: VisionTransformer,
    crops: torch.Tensor,
    text_features: torch.Tensor,
    settings: CLIPtraseSettings,
    logit_scale: float,
    refine: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Patch similarities and filtered cluster maps of a batch of windows (B, 3, h, w).

    `refine`, if given, maps the L2-normalised patch features (B, rows, cols, D) before the text product (the
    configured feature refinements).

    Returns:
        logits (B, Q, rows, cols) float32 (cosines; with `cls_weighting` times the class token's scaled scores),
        and per window its filtered cluster maps (K, 4 rows, 4 cols) on the CPU, or None if DBSCAN found no cluster.
        The correlation matrices are dropped before returning.
    """
    rows, cols = visual.grid_size(crops.shape[-2], crops.shape[-1])
    tokens, matrix = cliptrase_tokens(visual, crops.to(visual.conv1.weight.dtype))
    features = F.normalize(tokens.float(), dim=-1)  # (B, 1 + P, D)
    text = text_features.to(features.device, torch.float32)
    patches = features[:, 1:].reshape(crops.shape[0], rows, cols, -1)  # (B, rows, cols, D)
    if refine is not None:
        patches = refine(patches)
    logits = patches @ text.T  # (B, rows, cols, Q)
    if settings.cls_weighting:  # per query, the class token's scaled score
        logits = logits * (logit_scale * (features[:, :1] @ text.T))[:, None]
    logits = logits.permute(0, 3, 1, 2)  # (B, Q, rows, cols)
    denoised = denoised_correlation(matrix.float())
    del matrix
    maps = []
    for rows_of_w in denoised:
        labels = cluster_patches(rows_of_w, settings)
        maps.append(cluster_maps(rows_of_w, labels, (rows, cols)))
    return logits, maps


def _box_on_original(window, resized_size: tuple[int, int], original_size: tuple[int, int]) -> tuple[int, ...]:
    scale_y = original_size[0] / resized_size[0]
    scale_x = original_size[1] / resized_size[1]
    y1, y2 = int(round(window.y1 * scale_y)), int(round(window.y2 * scale_y))
    x1, x2 = int(round(window.x1 * scale_x)), int(round(window.x2 * scale_x))
    return y1, max(y2, y1 + 1), x1, max(x2, x1 + 1)


def vote_on_windows(
    labels: torch.Tensor,
    windows: list,
    maps: list[torch.Tensor | None],
    resized_size: tuple[int, int],
) -> torch.Tensor:
    """The cluster vote of every window on the labels (H0, W0) of the whole image: (H0, W0) int64.

    Each window's box is brought to the labels' size; its clusters (assigned at that box's size) vote against the
    labels inside it, and every pixel takes the most frequent vote of the windows covering it (ties to the smallest
    label). A window without clusters votes for the labels as they are. With one window covering the whole image
    (the centre-crop protocol) this is exactly the official script's vote.
    """
    original_size = tuple(labels.shape)
    slots: list[torch.Tensor] = []  # per covering layer, (H0, W0) votes, -1 where no vote
    for window, window_maps in zip(windows, maps):
        y1, y2, x1, x2 = _box_on_original(window, resized_size, original_size)
        region = labels[y1:y2, x1:x2]
        if window_maps is None:
            voted = region
        else:
            assignment = cluster_assignment(window_maps.to(labels.device), (y2 - y1, x2 - x1))
            voted = majority_vote(region, assignment, window_maps.shape[0])
        for slot in slots:  # the first layer still free over the whole box
            if bool((slot[y1:y2, x1:x2] < 0).all()):
                slot[y1:y2, x1:x2] = voted
                break
        else:
            slot = torch.full_like(labels, -1)
            slot[y1:y2, x1:x2] = voted
            slots.append(slot)
    if not slots:
        return labels.clone()
    votes = torch.stack(slots)  # (S, H0, W0)
    if votes.shape[0] == 1:
        return torch.where(votes[0] >= 0, votes[0], labels)
    counts = torch.stack([((votes == votes[i]) & (votes[i] >= 0)).sum(dim=0) for i in range(votes.shape[0])])
    span = int(labels.max()) + int(votes.max()) + 2
    score = torch.where(votes >= 0, counts * span - votes, torch.full_like(votes, -1))  # most votes, then smallest
    best = votes.gather(0, score.argmax(dim=0, keepdim=True))[0]
    return torch.where(best >= 0, best, labels)


# ------------------------------------------------------------------------------------------ centre-crop protocol
PROTOCOLS = ("standard", "centre_crop")


def read_rgb(image) -> Image.Image:
    """Any image input as a PIL RGB image; files are decoded with PIL, as the official script does."""
    from pathlib import Path

    from itaclip_core.inference.preprocess import ImageReadError, to_bgr_uint8

    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ImageReadError(f"image file not found: {path}")
        try:
            with Image.open(path) as opened:
                return opened.convert("RGB")
        except OSError as error:
            raise ImageReadError(f"could not decode {path} as an image ({error})") from None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return Image.fromarray(np.ascontiguousarray(to_bgr_uint8(image)[:, :, ::-1]))


def prepare_centre_crop(image, size: int, name: str | None = None):
    """The official preprocessing as a `PreparedImage`: the normalised n x n crop, whose size is its own
    "original size" (predictions are at the crop, as the script scores them)."""
    from pathlib import Path

    from itaclip_core.inference.preprocess import PreparedImage

    if name is None:
        name = Path(image).name if isinstance(image, (str, Path)) else ""
    crop = centre_crop_image(read_rgb(image), size)
    return PreparedImage(tensor=normalise_rgb(crop), original_size=(size, size), name=name)


def denormalise_rgb(tensor: torch.Tensor) -> np.ndarray:
    """Inverse of `normalise_rgb` for display: (3, H, W) -> (H, W, 3) uint8 RGB."""
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    values = (tensor.detach().float().cpu() * std + mean).mul(255.0).round().clamp(0, 255).byte()
    return values.permute(1, 2, 0).numpy()


def crop_label_map(labels: np.ndarray, size: int) -> np.ndarray:
    """A ground-truth map brought to the crop as the script does: nearest resize of the short side, centre crop."""
    image = Image.fromarray(labels.astype(np.int32), mode="I")
    width, height = image.size
    new_w, new_h = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.NEAREST)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return np.asarray(image.crop((left, top, left + size, top + size))).astype(labels.dtype)


# ------------------------------------------------------------------------------------------------ dense readout
from itaclip_core.methods.base import DenseReadout, register_readout  # noqa: E402


def check_protocol(config) -> None:
    """`protocol` is known, and `centre_crop` is used with CLIPtrase's readout only."""
    if config.protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {config.protocol!r}")
    if config.protocol == "centre_crop" and config.readout != "cliptrase":
        raise ValueError(f"protocol=centre_crop is CLIPtrase's protocol (readout=cliptrase); readout is "
                         f"{config.readout!r}: use protocol=standard")


@register_readout("cliptrase")
class CLIPtraseReadout(DenseReadout):
    """CLIPtrase as the dense readout: its tower, per-window clusters, and the vote in `revise_labels`.

    For each batch of windows the correlation matrices become cluster maps at once and are dropped; the maps of the
    image's windows (K x 4 rows x 4 cols each) are all that is kept until the vote. Feature refinements apply to
    the patch features before the text product (the clusters come from block L-1 and are not affected).
    """

    shares_batches = False  # the vote of revise_labels uses the clusters of one image's windows

    def __init__(self, config, dense) -> None:
        super().__init__(config, dense)
        self.settings = settings_from(config)
        self._maps: list[torch.Tensor | None] | None = None

    def check(self, config) -> None:
        super().check(config)
        check_protocol(config)
        if config.image_engineering:
            raise ValueError("image_engineering=true: CLIPtrase's clusters are per window, not per view; "
                             "allowed: image_engineering=false")

    def patch_tokens(self, visual: VisionTransformer, images: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
        return cliptrase_tokens(visual, images, with_correlation=False)[0][:, 1:]

    @torch.no_grad()
    def window_logits(self, engine, crops: torch.Tensor, text: torch.Tensor, refinements=()) -> torch.Tensor:
        from itaclip_core.refinement.features import RefineContext

        model = engine.model
        text = text.to(model.device, torch.float32)
        logits, maps = [], []
        for start in range(0, crops.shape[0], engine.batch_size):
            chunk = crops[start : start + engine.batch_size].to(model.device)
            refine = None
            if refinements:
                context = RefineContext(chunk, text, self.config, model.visual.patch_size)

                def refine(patches: torch.Tensor, context: RefineContext = context) -> torch.Tensor:
                    for refinement in refinements:
                        patches = refinement.refine(patches, context)
                    return patches

            chunk_logits, chunk_maps = window_logits_and_clusters(model.visual, chunk, text, self.settings,
                                                                  self.config.logit_scale, refine)
            logits.append(chunk_logits)
            maps.extend(chunk_maps)
        self._maps = maps
        return torch.cat(logits)

    def revise_labels(self, labels: torch.Tensor, windows, image_size: tuple[int, int]) -> torch.Tensor:
        if self._maps is None or len(self._maps) != len(windows):
            raise RuntimeError("CLIPtrase's vote needs the clusters of this image's windows: run its logits first")
        maps, self._maps = self._maps, None
        return vote_on_windows(labels, list(windows), maps, image_size)
