# Two entry points on a fresh machine: `make demo` and `make test`.
# Both create .venv when it is missing and install the project into it (a no-op when nothing changed).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

# Demo settings: any of these can be overridden on the command line.
WEIGHTS      ?= ViT-B/16
DEMO_IMAGE   ?= itaclip_core/assets/sample_coffee.jpg
DEMO_CLASSES ?= cup, saucer, spoon, coffee, table, wall
DEMO_OUT     ?= out/demo

# Evaluation report (see `make report`).
PRESET    ?= itaclip_voc21
DATA_ROOT ?=
REPORT_OUT ?= out/report

# Comparison report (see `make compare`): CONFIGS is preset1,preset2,... or a YAML/JSON file of configurations.
CONFIGS     ?=
FOCUS       ?= person
NUM_IMAGES  ?=
COMPARE_OUT ?= out/compare

.PHONY: install demo test test-fast report compare clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[notebooks,test,llm,openclip,dino,sam,guided]"
	SAM2_BUILD_CUDA=0 $(BIN)/python -m pip install --quiet --no-build-isolation -c constraints.txt "sam2>=1.0" "hydra-core>=1.3.2" "iopath>=0.1.10"
	$(BIN)/python -m pip install --quiet -c constraints.txt "pydensecrf2>=1.1" || echo "pydensecrf2 did not build (it needs a C++ compiler and Python 3.11 or 3.12): the optional pydensecrf2 CRF backend is unavailable"
	touch $(STAMP)

install: $(STAMP)

demo: install
	ITACLIP_FLAG_NAMES="--weights=WEIGHTS=;--classes=DEMO_CLASSES=;--out=DEMO_OUT=" \
		$(BIN)/itaclip segment "$(DEMO_IMAGE)" --classes "$(DEMO_CLASSES)" --weights "$(WEIGHTS)" --out "$(DEMO_OUT)"
	@echo "Overlay written to $(DEMO_OUT)/"

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not notebook and not slow"

report: install
	@test -n "$(DATA_ROOT)" || (echo "make report needs DATA_ROOT=/path/to/dataset (and PRESET=..., WEIGHTS=...)"; exit 2)
	$(BIN)/python -m itaclip_core.evaluation.notebook_report --preset "$(PRESET)" --data-root "$(DATA_ROOT)" \
		--weights "$(WEIGHTS)" --out "$(REPORT_OUT)"

compare: install
	@test -n "$(CONFIGS)" -a -n "$(DATA_ROOT)" || (echo "make compare needs CONFIGS=preset1,preset2 (or a YAML/JSON file of configurations) and DATA_ROOT=/path/to/dataset (and WEIGHTS=..., FOCUS=..., NUM_IMAGES=...)"; exit 2)
	$(BIN)/python -m itaclip_core.evaluation.compare_notebook --configs "$(CONFIGS)" --data-root "$(DATA_ROOT)" \
		--weights "$(WEIGHTS)" --focus "$(FOCUS)" --out "$(COMPARE_OUT)" $(if $(NUM_IMAGES),--num-images $(NUM_IMAGES))

clean-venv:
	rm -rf $(VENV)
