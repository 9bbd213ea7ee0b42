"""Feature refinements (selfcorr, regional, sfr): hand-computable cases, composition order, settings, errors."""

from __future__ import annotations

import math

import pytest
import torch

from itaclip_core.inference.engine import DenseInference
from itaclip_core.methods import DENSE_READOUTS, DenseReadout, get_readout, register_readout
from itaclip_core.methods.resclip import sfr_matrix
from itaclip_core.presets import apply_overrides, get_preset
from itaclip_core.refinement.features import (
    REFINEMENTS,
    RefineContext,
    RegionalClues,
    SelfCorrelation,
    SemanticFeedback,
    build_refinements,
    region_spans,
)


def _grid(*vectors):
    """(1, 1, P, D) features of a 1 x P grid."""
    return torch.tensor(vectors, dtype=torch.float32)[None, None]


def test_selfcorr_on_two_orthogonal_patches():
    out = SelfCorrelation(temperature=0.05, alpha=0.5).refine(_grid([1.0, 0.0], [0.0, 2.0]))
    # cosines: 1 on the diagonal, 0 off it -> weights e^20 / (e^20 + 1) and 1 / (e^20 + 1)
    own, other = math.exp(20) / (math.exp(20) + 1), 1 / (math.exp(20) + 1)
    expected = torch.tensor([[0.5 + 0.5 * own, 0.5 * other * 2.0], [0.5 * other, 0.5 * 2.0 + 0.5 * own * 2.0]])
    assert torch.allclose(out[0, 0], expected, atol=1e-6)


def test_selfcorr_alpha_zero_is_the_identity_and_equal_features_are_fixed():
    features = torch.randn(2, 3, 4, 8)
    assert torch.equal(SelfCorrelation(alpha=0.0).refine(features), features)
    same = torch.ones(1, 2, 2, 3)
    assert torch.allclose(SelfCorrelation(alpha=0.7).refine(same), same, atol=1e-6)


def test_region_spans_tile_the_axis_with_the_overlap():
    spans = region_spans(8, 4, 0.25)
    size = 8 / 3.25
    assert spans[0] == (0.0, pytest.approx(size))
    assert spans[-1][1] == pytest.approx(8.0)
    for (s0, e0), (s1, _) in zip(spans, spans[1:]):
        assert e0 - s1 == pytest.approx(0.25 * size)  # neighbours share a quarter of a region


def test_regional_with_one_region_adds_the_global_mean_at_the_patch_norm():
    features = _grid([1.0, 0.0], [0.0, 3.0])
    out = RegionalClues(grid=1, overlap=0.0, beta=0.6).refine(features)
    mean = torch.tensor([0.5, 1.5])  # one region = all patches: regional = global = the mean
    for p, f in enumerate(features[0, 0]):
        combined = f + 0.4 * mean + 0.6 * mean
        assert torch.allclose(out[0, 0, p], f.norm() * combined / combined.norm(), atol=1e-6)


def test_regional_keeps_constant_features_and_feature_norms():
    same = torch.ones(1, 6, 5, 4)
    assert torch.allclose(RegionalClues().refine(same), same, atol=1e-6)
    features = torch.randn(2, 7, 9, 16)
    out = RegionalClues().refine(features)
    assert torch.allclose(out.norm(dim=-1), features.norm(dim=-1), atol=1e-5)
    assert not torch.allclose(out, features, atol=1e-3)


def test_sfr_matrix_by_hand():
    # 1 x 3 grid, labels 0 1 0: patches 0 and 2 share a label, but the straight path crosses patch 1 -> decayed
    # by exp(-2 / 2); a sigma this small gives a one-tap smoothing kernel.
    matrix = sfr_matrix(torch.tensor([[0, 1, 0]]), sigma=0.1)
    decay = math.exp(-1.0)
    expected = torch.tensor([[1 / (1 + decay), 0, decay / (1 + decay)], [0, 1, 0],
                             [decay / (1 + decay), 0, 1 / (1 + decay)]])
    assert matrix.shape == (4, 4) and torch.all(matrix[0] == 0) and torch.all(matrix[:, 0] == 0)
    assert torch.allclose(matrix[1:, 1:], expected, atol=1e-6)
    # without the path check the two are simply equal
    plain = sfr_matrix(torch.tensor([[0, 1, 0]]), sigma=0.1, delete_same_entity=False)
    assert torch.allclose(plain[1, 1:], torch.tensor([0.5, 0.0, 0.5]), atol=1e-6)


def test_sfr_refinement_mixes_features_of_same_label_patches():
    torch.manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(1, 2, 3, 8), dim=-1)
    crops = torch.zeros(1, 3, 32, 48)
    text = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    config = get_preset("naclip_voc21")
    context = RefineContext(crops, text, config, 16)
    # temp_thd 1: no pixel passes, every label is 0 -> one entity, S is the smoothed all-ones matrix
    out = SemanticFeedback(weight=1.0, temp_thd=1.0, pamr_steps=0).refine(features, context)
    matrix = sfr_matrix(torch.zeros(2, 3, dtype=torch.long), 5.0)[1:, 1:]
    assert torch.allclose(out.view(6, 8), matrix @ features.view(6, 8), atol=1e-6)
    assert torch.equal(SemanticFeedback(weight=0.0, pamr_steps=0).refine(features, context), features)


def test_refinements_are_applied_in_the_configured_order(tiny_clip, golden_forward):
    crops = golden_forward["image_224"][:1, :, :112, :144]
    text = torch.nn.functional.normalize(torch.randn(5, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    logits = {}
    for order in (("selfcorr", "regional"), ("regional", "selfcorr")):
        config = get_preset("naclip_voc21").replace(refine=order)
        engine = DenseInference(tiny_clip, config.dense_config(), crop=0, image_engineering=False,
                                readout=get_readout(config), refinements=build_refinements(config))
        features = engine.window_features(crops)
        expected = features
        for name in order:
            expected = REFINEMENTS[name].from_config(config).refine(expected, RefineContext(crops, text, config, 16))
        logits[order] = engine.readout.window_logits(engine, crops, text, engine.refinements)
        assert torch.allclose(logits[order], (expected @ text.T).permute(0, 3, 1, 2), atol=1e-6)
    assert not torch.allclose(logits[("selfcorr", "regional")], logits[("regional", "selfcorr")], atol=1e-4)


def test_refine_is_read_from_set_and_unknown_names_are_listed():
    config = apply_overrides(get_preset("naclip_voc21"), ["refine=selfcorr,regional", "regional_beta=0.3"])
    assert config.refine == ("selfcorr", "regional")
    assert [r.name for r in build_refinements(config)] == ["selfcorr", "regional"]
    assert build_refinements(config)[1].beta == 0.3
    with pytest.raises(ValueError, match="unknown feature refinement 'nope'; registered: regional, selfcorr, sfr"):
        build_refinements(config.replace(refine=("nope",)))


@pytest.mark.parametrize("setting,value,message", [
    ("selfcorr_temperature", 0.0, "selfcorr_temperature=0.0: must be in \\(0.0, inf\\]"),
    ("selfcorr_alpha", 1.5, "selfcorr_alpha=1.5: must be in \\[0.0, 1.0\\]"),
    ("regional_beta", -0.1, "regional_beta"),
    ("regional_grid", 0, "regional_grid=0: must be an integer >= 1"),
    ("regional_overlap", 1.0, "regional_overlap"),
    ("sfr_refine_weight", 2.0, "sfr_refine_weight"),
])
def test_out_of_range_settings_name_the_setting(setting, value, message):
    config = get_preset("naclip_voc21").replace(refine=("selfcorr", "regional", "sfr"), **{setting: value})
    with pytest.raises(ValueError, match=message):
        build_refinements(config)


def test_a_refinement_that_does_not_fit_the_readout_is_refused():
    @register_readout("logits-only-test")
    class LogitsOnly(DenseReadout):
        accepts_refinements = False

    try:
        config = get_preset("naclip_voc21").replace(readout="logits-only-test", refine=("selfcorr",))
        with pytest.raises(ValueError, match="refine=selfcorr: .*'logits-only-test' readout.*allowed: refine=none"):
            get_readout(config)
    finally:
        DENSE_READOUTS.pop("logits-only-test")
