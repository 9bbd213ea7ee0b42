"""Step timing and FLOP counting (`itaclip_core.timing`), the CPU attention kernel, the grouped MLP, the model
builder without a throw-away initialisation, `itaclip segment --timings` and the latency benchmark."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from itaclip_core.timing import StepTimes, step, timed


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_steps_record_their_own_time_and_add_up_to_the_whole():
    with StepTimes() as times:
        with step("outer"):
            _busy(0.03)
            with step("inner"):
                _busy(0.05)
                with step("outer"):  # entered again while running: counted once, as part of "inner"
                    _busy(0.02)
        _busy(0.01)
    assert set(times.seconds) == {"outer", "inner"}
    assert 0.065 <= times.seconds["inner"] < 0.2
    assert 0.025 <= times.seconds["outer"] < 0.1
    assert times.total_seconds >= sum(times.seconds.values()) + 0.009
    lines = times.summary().splitlines()
    assert [line.split()[0] for line in lines] == ["inner", "outer", "other", "total"]


def test_nothing_is_recorded_without_an_active_recorder():
    calls = []

    @timed("work")
    def work(x):
        calls.append(x)
        return 2 * x

    assert work(3) == 6
    with StepTimes() as times:
        assert work(4) == 8
    assert work(5) == 10
    assert calls == [3, 4, 5] and list(times.seconds) == ["work"]


def test_flops_are_counted_per_step_matrix_products_and_attention():
    a, b = torch.randn(30, 40), torch.randn(40, 50)
    q, k, v = torch.randn(2, 3, 17, 8), torch.randn(2, 3, 13, 8), torch.randn(2, 3, 13, 5)
    with StepTimes(count_flops=True) as times:
        with step("product"):
            a @ b
            with step("attention"):
                F.scaled_dot_product_attention(q, k, v)
    assert times.flops["product"] == 2 * 30 * 40 * 50
    assert times.flops["attention"] == 2 * 2 * 3 * 17 * 13 * (8 + 5)
    assert times.total_flops == times.flops["product"] + times.flops["attention"]


def test_image_tower_flops_match_the_vit_arithmetic(tiny_clip):
    from itaclip_core.attention.dense import DENSE_METHODS, dense_tokens

    visual, config = tiny_clip.visual, tiny_clip.config
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad(), StepTimes(count_flops=True) as times:
        dense_tokens(visual, images, DENSE_METHODS["clip"])
    batch, tokens, width = 2, 197, config.vision_width
    hidden, patch = 4 * width, config.patch_size
    per_block = 2 * batch * tokens * (3 * width * width + width * width + 2 * width * hidden)
    attention = 2 * batch * tokens * tokens * 2 * width  # all heads together: 2 N N (d + d) per head
    expected = (2 * batch * 196 * 3 * patch * patch * width + config.vision_layers * (per_block + attention)
                + 2 * batch * tokens * width * config.embed_dim)
    assert times.flops["image tower"] == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grouped_cpu_attention_matches_the_fused_kernel(dtype):
    from itaclip_core.model.kernels import attention

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 12, 197, 64, generator=generator) for _ in range(3))
    exact = F.scaled_dot_product_attention(q, k, v)
    with torch.no_grad():
        grouped = attention(q.to(dtype), k.to(dtype), v.to(dtype)).float()
        fused = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype)).float()
    # within the rounding of the dtype, as the fused kernel in the same dtype
    tolerance = 3 * (fused - exact).abs().max().item()
    assert (grouped - exact).abs().max().item() <= max(tolerance, 2e-2)
    assert (grouped - exact).abs().mean().item() < 2 * (fused - exact).abs().mean().item() + 1e-4


def test_float32_attention_is_the_fused_kernel_itself():
    from itaclip_core.model.kernels import attention

    q, k, v = (torch.randn(2, 4, 50, 16) for _ in range(3))
    with torch.no_grad():
        assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
        scaled = attention(q, k, v, scale=0.3)
    assert torch.equal(scaled, F.scaled_dot_product_attention(q, k, v, scale=0.3))


def test_grouped_mlp_gives_the_ungrouped_result(monkeypatch):
    from itaclip_core.model import clip

    torch.manual_seed(0)
    block = clip.ResidualAttentionBlock(64, 2).eval()
    x = torch.randn(5, 300, 64)
    whole = block.ls_2(block.mlp(block.ln_2(x)))
    monkeypatch.setattr(clip, "_MLP_GROUP_BYTES", 64 * 4 * 4 * 37)  # groups of 37 rows
    with torch.no_grad():
        grouped = block.feed_forward(x)
    torch.testing.assert_close(grouped, whole, rtol=0, atol=1e-6)
    with torch.enable_grad():  # training keeps the plain path (autograd through one call)
        assert block.feed_forward(x.requires_grad_()).requires_grad


def test_models_are_built_from_the_state_alone(golden_dir):
    from itaclip_core.model.checkpoint import read_state_dict
    from itaclip_core.model.random import random_clip_state_dict
    from itaclip_core.model.weights import build_clip

    state = random_clip_state_dict("tiny", seed=3)
    model = build_clip(state, "random-tiny:3")
    for name, tensor in model.state_dict().items():
        assert tensor.device.type == "cpu" and tensor.dtype == torch.float32
        assert torch.equal(tensor, state[name]), name
    assert not any(p.requires_grad for p in model.parameters())
    half = build_clip(read_state_dict(golden_dir / "tiny_clip_openai_fp16.pt"), "golden", torch.float16)
    assert half.dtype == torch.float16 and half.visual.ln_post.weight.dtype == torch.float32


def test_segment_timings_report(tmp_path, capsys):
    from itaclip_core.cli import main

    path = tmp_path / "img.png"
    Image.fromarray(np.full((64, 80, 3), 90, np.uint8)).save(path)
    code = main(["segment", str(path), "--classes", "cat, sky", "--weights", "random-tiny", "--out",
                 str(tmp_path / "out"), "--set", "stride=112", "--no-progress", "--timings"])
    assert code == 0
    report = capsys.readouterr().err
    steps = [line.split()[0] for line in report.splitlines()[1:]]
    for name in ("model", "text", "image", "stitch", "labels", "write", "total"):
        assert name in steps, report


def test_latency_benchmark_reports_every_step(tmp_path, capsys):
    from itaclip_core import latency

    path = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (224, 260, 3), np.uint8)).save(path)
    code = latency.main(["--weights", "random-tiny", "--image", str(path), "--images", "2",
                         "--json", str(tmp_path / "latency.json")])
    assert code == 0
    out = capsys.readouterr().out
    for text in ("GEMM 4096^3", "image tower", "first image / marginal image", "text classifier (empty cache)"):
        assert text in out
    import json

    result = json.loads((tmp_path / "latency.json").read_text())["results"][0]
    assert result["image_flops"]["image tower"] > 0 and result["text_flops"] > 0
    assert len(result["images"]) == 2 and result["gemm_gflops"] > 0
    for record in result["images"]:
        assert sum(record["seconds"].values()) <= record["total_seconds"] + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_attention_matches_the_fused_kernel(dtype):
    from itaclip_core.model.kernels import masked_attention

    generator = torch.Generator().manual_seed(1)
    q = torch.randn(40, 8, 9, 64, generator=generator)
    k, v = (torch.randn(40, 8, 14, 64, generator=generator) for _ in range(2))
    mask = torch.ones(9, 14, dtype=torch.bool).tril(diagonal=5)  # the text tower's shared-prefix causal mask
    exact = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with torch.no_grad():
        ours = masked_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask).float()
        fused = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask).float()
    if dtype == torch.float32:
        assert torch.equal(ours, exact)
    else:
        assert (ours - exact).abs().max().item() <= max(3 * (fused - exact).abs().max().item(), 2e-2)
    # a masked-out key never contributes: changing it changes nothing
    changed = v.clone()
    changed[:, :, -1] = 1e3
    with torch.no_grad():
        again = masked_attention(q.to(dtype), k.to(dtype), changed.to(dtype), mask).float()
    assert torch.equal(again[:, :, :8], ours[:, :, :8])


def test_views_are_torchvisions_grayscale_and_blur():
    tf = pytest.importorskip("torchvision.transforms.functional")
    from itaclip_core.inference.views import gaussian_blur, grayscale

    crops = torch.randn(4, 3, 40, 52, generator=torch.Generator().manual_seed(2))
    assert torch.equal(grayscale(crops), tf.rgb_to_grayscale(crops, num_output_channels=3))
    assert torch.equal(gaussian_blur(crops), tf.gaussian_blur(crops, kernel_size=[11, 11], sigma=[5.0, 5.0]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_layer_norm_rounds_the_float32_result(dtype):
    from itaclip_core.model.clip import LayerNorm

    torch.manual_seed(0)
    norm = LayerNorm(96)
    torch.nn.init.normal_(norm.weight, 1.0, 0.1)
    torch.nn.init.normal_(norm.bias, 0.0, 0.1)
    x = (3 * torch.randn(400, 96)).to(dtype)
    exact = F.layer_norm(x.float(), (96,), norm.weight, norm.bias, norm.eps)
    with torch.no_grad():
        ours = norm(x)
    assert ours.dtype == dtype
    rounded = exact.to(dtype).float()
    # the float32 result rounded to the dtype, but for an occasional neighbour at a rounding tie
    ulp = torch.finfo(dtype).eps * exact.abs().clamp(min=1.0)
    assert ((ours.float() - rounded).abs() <= ulp).all()
    assert (ours.float() != rounded).float().mean().item() < 1e-3
