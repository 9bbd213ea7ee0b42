"""The notebooks: committed without outputs and following the template, and each one runs under papermill with
notebooks/ci_parameters.yaml (random tiny CLIP, synthetic VOC data) and records sane results and figures.

The executions are marked `notebook` (`pytest -m "not notebook"` skips them); together they take a minute or two
on two CPU cores.
"""

from __future__ import annotations

import ast
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from PIL import Image

from itaclip_core import explore
from itaclip_core.data.synthetic import make_synthetic_dataset
from itaclip_core.evaluation import compare_notebook, notebook_report

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
CI_PARAMETERS = NOTEBOOK_DIR / "ci_parameters.yaml"
CELL_TIMEOUT = 120  # seconds per cell (papermill's execution_timeout)
NOTEBOOK_TIMEOUT = 240  # seconds per notebook (pytest-timeout)

# notebook -> (keys its results must hold, figures it must write)
EXPECTED: dict[str, tuple[set[str], set[str]]] = {
    "00_quickstart": ({"classes", "areas", "image_size", "seconds"}, {"00_overlay.png", "00_probabilities.png"}),
    "01_dense_clip": ({"image_level_probabilities", "share_of_patches_on_top_class", "attention_overlap",
                       "classes_found"},
                      {"01_image_level.png", "01_pca.png", "01_similarity.png", "01_attention.png",
                       "01_segmentation.png"}),
    "02_attention": ({"top10_concentration", "classes_found", "mIoU", "num_images"},
                     {"02_attention_variants.png", "02_fusion.png", "02_segmentation.png", "02_miou.png"}),
    "03_image_engineering": ({"agreement_with_mix", "mean_abs_difference_from_mix", "mIoU", "num_images"},
                             {"03_views.png", "03_view_segmentations.png", "03_view_miou.png"}),
    "04_text_enhancement": ({"num_templates", "retrieval", "sweep", "best", "num_images", "typed_pixels_changed"},
                            {"04_name_text_similarity.png", "04_aux_coef.png", "04_typed_classes.png"}),
    "05_refinement": ({"windows_per_stride", "pixels_changed_per_step", "prob_thd_share_to_class0",
                       "area_thd_classes_kept", "closing_pixels_changed", "refinement_seconds",
                       "refinement_labels_changed"},
                      {"05_windows.png", "05_pamr.png", "05_steps.png", "05_thresholds.png", "05_closing.png",
                       "05_boundary_refinements.png"}),
    "06_ablations": ({"rows", "num_images", "preset"}, {"06_ablation.png"}),
    "07_evaluation": ({"mIoU", "mAcc", "aAcc", "per_class", "num_images", "run"},
                      {"07_per_class_iou.png", "07_examples.png"}),
    "08_speed": ({"timings", "speedup_vs_straightforward", "max_abs_difference", "label_agreement", "num_images"},
                 {"08_throughput.png", "08_memory.png"}),
    "09_explorer": ({"settings", "areas", "updates", "seconds"}, {"09_explorer.png"}),
    "10_method_zoo": ({"methods", "top10_concentration", "seconds", "areas", "classes_found",
                       "refinement_pixels_changed"},
                      {"10_attention.png", "10_segmentation.png", "10_areas.png", "10_refinements.png"}),
    "11_masks": ({"masks_per_source", "generation_seconds", "pixels_changed_by_vote", "attention_inside_mask",
                  "areas"},
                 {"11_proposals.png", "11_partition.png", "11_vote.png", "11_scoped_attention.png", "11_areas.png"}),
    "12_backbones": ({"backbones", "settings", "grids", "attention", "areas", "label_agreement", "seconds"},
                     {"12_grids.png", "12_attention.png", "12_segmentation.png"}),
    "13_compare": ({"configurations", "paired", "differ_most", "focus", "num_images", "weights_id"},
                   {"13_main.png", "13_heatmap.png", "13_paired.png", "13_focus_distribution.png",
                    "13_focus_gallery.png"}),
    "14_person": ({"steps", "left_out", "configurations", "focus_figures", "shown", "num_images"},
                  {"14_steps.png", "14_heatmap.png", "14_focus_distribution.png", "14_attention.png",
                   "14_errors.png"}),
}  # fmt: skip
# Parameters some notebooks read beyond the shared ones (papermill injects them). 13 focuses on a class the CI
# images hold (horse), so that its gallery is drawn; 14 keeps person, which they do not hold.
EXTRA_PARAMETERS: dict[str, dict[str, Any]] = {
    "13_compare": {"COMPARE": "itaclip_voc21,sclip_voc21", "FOCUS": "horse", "BOOTSTRAP": 200},
    "14_person": {"BOOTSTRAP": 200, "EXTRA_METHODS": ["naclip", "scclip"],
                  "EXTRA_SETTINGS": ["refine=selfcorr", "logit_refine=pamr,crf", "masks=superpixels"]},
}
SCORE_KEYS = ("mIoU", "mAcc", "aAcc")


def _notebook(name: str) -> dict[str, Any]:
    return json.loads((NOTEBOOK_DIR / f"{name}.ipynb").read_text(encoding="utf-8"))


def _source(cell: dict[str, Any]) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


# ------------------------------------------------------------------------------------------------ committed files
def test_committed_notebooks_are_stripped_and_follow_the_template() -> None:
    found = sorted(path.stem for path in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    assert found == sorted(EXPECTED)
    for name in found:
        problems = explore.notebook_problems(NOTEBOOK_DIR / f"{name}.ipynb")
        assert problems == [], f"{problems}: run python -m itaclip_core.explore strip notebooks/*.ipynb"
        cells = _notebook(name)["cells"]
        assert cells[0]["cell_type"] == "markdown" and _source(cells[0]).startswith(f"# {name[:2]} ")
        tagged = [i for i, cell in enumerate(cells) if "parameters" in cell.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{name}: exactly one cell must be tagged 'parameters'"
        tree = ast.parse(_source(cells[tagged[0]]))
        assigned = [target.id for node in tree.body if isinstance(node, ast.Assign) for target in node.targets]
        assert assigned == list(explore.PARAMETER_NAMES), f"{name}: the parameters cell defines {assigned}"
        assert f'explore.start_notebook("{name}", globals())' in _source(cells[tagged[0] + 1])
        assert "run.write_results(" in _source(cells[-1])


def test_ci_parameters_name_every_parameter() -> None:
    parameters = yaml.safe_load(CI_PARAMETERS.read_text(encoding="utf-8"))
    assert list(parameters) == list(explore.PARAMETER_NAMES)
    assert explore.is_random_model(parameters["MODEL"], parameters["WEIGHTS"])


# ------------------------------------------------------------------------------------------------ executions
@pytest.fixture(scope="session")
def ci_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The CI parameters with a synthetic VOC dataset and tmp output folders; a shared text-embedding cache."""
    work = tmp_path_factory.mktemp("notebooks")
    root = make_synthetic_dataset("voc21", work / "voc", num_images=3, sizes=((120, 160), (100, 150), (140, 110)),
                                  easy=True)  # fmt: skip
    parameters = yaml.safe_load(CI_PARAMETERS.read_text(encoding="utf-8"))
    parameters.update(DATA_ROOT=str(root), OUT_DIR=str(work / "out"), FIGURES_DIR=str(work / "figures"))
    (work / "executed").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ITACLIP_CACHE", str(work / "cache"))  # the kernels inherit the environment
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        patch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
        yield {"parameters": parameters, "work": work}


def _walk(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{path}/{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, f"{path}[{index}]")
    else:
        yield path, value


def check_results(name: str, out_dir: Path, figures_dir: Path, parameters: dict[str, Any]) -> dict[str, Any]:
    """The recorded JSON of a notebook is present and sane, and its figures are written; returns the results."""
    keys, figures = EXPECTED[name]
    payload = json.loads((out_dir / f"{name}.json").read_text(encoding="utf-8"))
    assert payload["notebook"] == name and payload["random_model"] is True
    assert Path(payload["python"]).resolve() == Path(sys.executable).resolve(), "the kernel is another Python"
    assert payload["parameters"]["DATA_ROOT"] == parameters["DATA_ROOT"]
    results = payload["results"]
    assert keys <= set(results), f"{name}: missing results {sorted(keys - set(results))}"
    for path, value in _walk(results):
        if isinstance(value, float):
            assert math.isfinite(value), f"{name}: {path} is {value}"
            if any(f"/{key}" in path for key in SCORE_KEYS):
                assert 0.0 <= value <= 100.0, f"{name}: {path} = {value} is not a percentage"
    missing = figures - set(payload["figures"])
    assert not missing, f"{name}: figures not recorded: {sorted(missing)}"
    for figure in figures:
        with Image.open(figures_dir / figure) as image:
            assert image.format == "PNG" and min(image.size) > 50, figure
    return results


@pytest.mark.notebook
@pytest.mark.timeout(NOTEBOOK_TIMEOUT)
@pytest.mark.parametrize("name", [name for name in EXPECTED if name != "07_evaluation"])
def test_notebook_runs_with_ci_parameters(name: str, ci_run: dict[str, Any]) -> None:
    import papermill

    parameters = {**ci_run["parameters"], **EXTRA_PARAMETERS.get(name, {})}
    papermill.execute_notebook(str(NOTEBOOK_DIR / f"{name}.ipynb"), str(ci_run["work"] / "executed" / f"{name}.ipynb"),
                               parameters=parameters, kernel_name="python3", cwd=str(ROOT),
                               execution_timeout=CELL_TIMEOUT, progress_bar=False)  # fmt: skip
    results = check_results(name, Path(parameters["OUT_DIR"]), Path(parameters["FIGURES_DIR"]), parameters)
    if name == "02_attention":
        assert set(results["mIoU"]) == {"qk", "selfself", "qq", "kk", "itaclip fused"}
    if name == "03_image_engineering":
        assert {"original", "first three", "flips", f"coef={results['img_eng_coef']}"} <= set(results["mIoU"])
    if name == "04_text_enhancement":
        assert {row["aux"] for row in results["sweep"]} == {"definitions", "synonyms"}
    if name == "06_ablations":
        assert [row["row"] for row in results["rows"]] == ["baseline", "+A", "+A+T", "+A+I", "+A+T+I"]
        assert results["num_images"] == parameters["NUM_IMAGES"]
    if name == "08_speed":
        assert results["max_abs_difference"] < 1e-4 and results["label_agreement"] > 0.99  # the two algorithms agree
    if name == "09_explorer":
        assert results["updates"] == 1
    if name == "13_compare":
        assert [row["name"] for row in results["configurations"]] == ["itaclip_voc21", "sclip_voc21"]
        assert results["focus"]["class"] == "horse" and results["focus"]["disagreement"]
        assert results["paired"][0]["bootstrap"]["resamples"] == 200
    if name == "14_person":
        steps = [step["step"] for step in results["steps"]]
        assert steps[:5] == ["SCLIP", "ITACLIP baseline", "ITACLIP +A", "ITACLIP +A+T", "ITACLIP"]
        for method in EXTRA_PARAMETERS["14_person"]["EXTRA_METHODS"]:  # every method asked for is a step
            assert f"{method}_voc21" in steps and not results["left_out"]
        assert len(steps) == 5 + 2 + len(EXTRA_PARAMETERS["14_person"]["EXTRA_SETTINGS"])
    if name == "10_method_zoo":
        assert set(results["methods"]) == set(explore.available_methods())
        assert {"ITACLIP", "SCLIP", "SC-CLIP", "CLIPtrase"} <= set(results["methods"])
        assert set(results["refinement_pixels_changed"]) == {"selfcorr", "regional", "sfr", "selfcorr,regional"}
    if name == "11_masks":
        assert results["masks_per_source"]["SLIC"] > 1 and results["coverage"]["SLIC"] == 1.0
        assert abs(results["attention_inside_mask"] - 1.0) < 1e-5  # SLIC covers every patch: all inside its mask
    if name == "12_backbones":
        b16, l14, h14 = (results["settings"][k] for k in ("ViT-B/16", "ViT-L/14", "OpenCLIP ViT-H/14"))
        assert (b16["patch_size"], b16["blocks"], l14["patch_size"], l14["blocks"], h14["blocks"]) == (16, 12, 14, 24, 32)
        assert b16["origin"] == "as tuned" and "not published" in l14["origin"]["fuse_blocks"]
        assert max(l14["fuse_blocks"]) > max(b16["fuse_blocks"]) and l14["crop"] == b16["crop"] // 16 * 14
        assert results["grids"]["ViT-L/14"]["window_grid"] == results["grids"]["ViT-B/16"]["window_grid"]
        assert h14["activation"] == "gelu" and results["warnings"]["ViT-L/14"]


@pytest.mark.notebook
@pytest.mark.timeout(NOTEBOOK_TIMEOUT)
def test_report_runs_the_evaluation_notebook_and_renders_html(ci_run: dict[str, Any]) -> None:
    parameters = ci_run["parameters"]
    out = ci_run["work"] / "report"
    argv = ["--preset", parameters["PRESET"], "--data-root", parameters["DATA_ROOT"], "--weights", "random-tiny",
            "--out", str(out), "--num-images", "2", "--parameters", str(CI_PARAMETERS), "--cell-timeout",
            str(CELL_TIMEOUT)]  # fmt: skip
    assert notebook_report.main(argv) == 0
    html = (out / "07_evaluation.html").read_text(encoding="utf-8")
    assert "Benchmark report" in html and "mIoU" in html and "data:image/png;base64" in html
    results = check_results("07_evaluation", out, out / "figures", {**parameters, "DATA_ROOT": str(Path(
        parameters["DATA_ROOT"]).resolve())})  # fmt: skip
    assert results["num_images"] == 2 and len(results["per_class"]) == 21
    assert results["run"]["computed"] == 2
    # a second run resumes from the records: nothing is recomputed, the numbers are the same
    assert notebook_report.main(argv) == 0
    again = check_results("07_evaluation", out, out / "figures", {**parameters, "DATA_ROOT": str(Path(
        parameters["DATA_ROOT"]).resolve())})  # fmt: skip
    assert again["run"]["computed"] == 0 and again["run"]["loaded_from_records"] == 2
    assert again["mIoU"] == results["mIoU"]


def test_report_parameters() -> None:
    named = notebook_report.report_parameters("itaclip_voc21", "data/voc", "ViT-B/16", "out/r", num_images=5)
    assert (named["MODEL"], named["WEIGHTS"], named["NUM_IMAGES"]) == ("ViT-B/16", None, 5)
    assert named["DATASET"] is None and "DEVICE" not in named  # the preset's dataset; the notebook's device
    assert named["FIGURES_DIR"] == str(Path(named["OUT_DIR"]) / "figures") and Path(named["DATA_ROOT"]).is_absolute()
    path = notebook_report.report_parameters("itaclip_voc21", "d", "ckpt/model.pt", "o", overrides=["stride=56"],
                                             base={"MODEL": "ViT-B/16", "OVERRIDES": ["batch_size=8"]})  # fmt: skip
    assert path["MODEL"] == "ViT-B/16" and path["WEIGHTS"] == str(Path("ckpt/model.pt").resolve())
    assert path["OVERRIDES"] == ["batch_size=8", "stride=56"]
    kept = notebook_report.report_parameters("itaclip_voc21", "d", "random-tiny", "o",
                                             base={"NUM_IMAGES": 2, "DEVICE": "cpu", "DATASET": "voc21"})  # fmt: skip
    assert (kept["NUM_IMAGES"], kept["DEVICE"], kept["DATASET"]) == (2, "cpu", None)  # the preset names the dataset


@pytest.mark.notebook
@pytest.mark.timeout(NOTEBOOK_TIMEOUT)
def test_make_compare_runs_the_comparison_notebook_and_renders_html(ci_run: dict[str, Any]) -> None:
    parameters = ci_run["parameters"]
    out = ci_run["work"] / "compare_report"
    argv = ["--configs", "itaclip_voc21,sclip_voc21", "--data-root", parameters["DATA_ROOT"], "--weights",
            "random-tiny", "--out", str(out), "--num-images", "2", "--focus", "horse", "--parameters",
            str(CI_PARAMETERS), "--cell-timeout", str(CELL_TIMEOUT)]  # fmt: skip
    assert compare_notebook.main(argv) == 0
    html = (out / "13_compare.html").read_text(encoding="utf-8")
    assert "Comparing configurations" in html and "published mIoU" in html and "data:image/png;base64" in html
    resolved = {**parameters, "DATA_ROOT": str(Path(parameters["DATA_ROOT"]).resolve())}
    results = check_results("13_compare", out, out / "figures", resolved)
    assert [row["name"] for row in results["configurations"]] == ["itaclip_voc21", "sclip_voc21"]
    records = out / "13_compare_voc21" / "configs" / "sclip_voc21" / "records" / "rank0.jsonl"
    stamp = records.stat().st_mtime_ns
    assert compare_notebook.main(argv) == 0  # finished configurations are read, not run again
    assert records.stat().st_mtime_ns == stamp
    assert check_results("13_compare", out, out / "figures", resolved)["configurations"] == results["configurations"]


def test_make_compare_refuses_bad_input_before_the_notebook(ci_run: dict[str, Any], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    root = ci_run["parameters"]["DATA_ROOT"]
    for configs, focus, message in (("itaclip_voc21,nope_voc21", "person", "unknown preset 'nope_voc21'"),
                                    ("itaclip_voc21,sclip_context60", "person", "different datasets"),
                                    ("itaclip_voc21", "persn", "--focus persn")):  # fmt: skip
        argv = ["--configs", configs, "--data-root", root, "--weights", "random-tiny", "--out", str(tmp_path / "o"),
                "--focus", focus]  # fmt: skip
        assert compare_notebook.main(argv) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    grid = tmp_path / "grid.yaml"
    grid.write_text("- {name: a, preset: sclip_voc21}\n")
    made = compare_notebook.compare_parameters(str(grid), root, "random-tiny", tmp_path / "o", "person")
    assert made["COMPARE"] == str(grid.resolve()) and made["PRESET"] == "sclip_voc21" and made["FOCUS"] == "person"
