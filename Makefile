# Two entry points for a fresh machine (Python >= 3.10 and pip are all it needs):
#   make demo   install pand in .venv and run the offline quickstart: the whole PAND pipeline on Fashion-MNIST
#   make test   install pand with its test extras in .venv and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.pand-installed

.PHONY: demo test install fashion-mnist clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, with lower bounds only: where a local wheel satisfies them pip takes it instead of downloading.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch>=2.1" "torchvision>=0.16"
	$(PIP) install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST from Debian's package where apt is usable; otherwise pand downloads it (data.download=true).
fashion-mnist:
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null \
	    && [ "$$(id -u)" = 0 ]; then apt-get install -y -q dataset-fashion-mnist >/dev/null || true; fi

demo: $(STAMP) fashion-mnist
	$(VENV)/bin/pand quickstart --out runs/quickstart --download

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
