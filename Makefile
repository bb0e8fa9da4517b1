# Two entry points for a fresh machine (Python >= 3.10 and pip are all it needs):
#   make demo   install pand in .venv (without the test tools) and run the offline quickstart: the whole PAND
#               pipeline on Fashion-MNIST
#   make test   install pand with its test extras in .venv and run the test suite
#   (make torch / install / install-test: only the install steps)
#
# Which torch build goes into .venv:
#   TORCH=auto   (default) the CUDA build where `nvidia-smi -L` lists a GPU; otherwise the CPU build from
#                TORCH_CPU_INDEX (probed for a few seconds first) or, where that index cannot be reached, the default
#                build of pip's configured index (on Linux x86_64 the CUDA build, about 5 GB more disk), with a message.
#   TORCH=cpu    the CPU build from TORCH_CPU_INDEX; stops with an error where that index cannot be reached.
#   TORCH=cuda   the default build of pip's configured index (on Linux x86_64 the CUDA build).
#   TORCH_INDEX=<url>  install torch and torchvision from this index instead (pip --index-url), whatever TORCH says:
#                e.g. a mirror of the CPU wheels, or https://download.pytorch.org/whl/cu118 for an older CUDA driver.
# The build is chosen once per .venv: `make clean` before switching.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= auto
TORCH_INDEX ?=
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# Lower bounds only: where a local wheel satisfies them pip takes it instead of downloading.
TORCH_REQS := "torch>=2.1" "torchvision>=0.16"

PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_STAMP := $(VENV)/.pand-torch
TORCH_PIN := $(VENV)/pand-torch-pin.txt
DEMO_STAMP := $(VENV)/.pand-demo
TEST_STAMP := $(VENV)/.pand-test
# pip compiles each installed file to bytecode one at a time (about 35 s for torch and the rest on one core);
# installing with --no-compile and then compiling with a process per core (compileall -j 0) does the same work in
# about 20 s on 2 cores. A file that does not compile is skipped, as pip skips it.
COMPILE = $(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
	>/dev/null 2>&1 || true

.PHONY: demo test install install-test torch fashion-mnist clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Exit status 0 when the index URL (argv[1]) answers within a few seconds (DNS included); else prints why and exits 1.
define TORCH_PROBE
import sys, threading, urllib.request
url = sys.argv[1].rstrip("/") + "/torch/"
result = []
def probe():
    try:
        urllib.request.urlopen(url, timeout=5).close()
        result.append(None)
    except Exception as exc:
        result.append(f"{type(exc).__name__}: {exc}")
thread = threading.Thread(target=probe, daemon=True)
thread.start()
thread.join(8)
why = result[0] if result else "no answer within 8 s"
if why:
    print(f"pand: {url} is unreachable ({why})")
sys.exit(1 if why else 0)
endef
export TORCH_PROBE

# torch and torchvision first, so that `pip install -e .` finds them installed and keeps them; the installed versions
# are then pinned (a constraint file) so that no later step swaps the CPU build for the default one.
$(TORCH_STAMP): | $(PY)
	$(PIP) install -q --upgrade pip
	@set -e; index="$(TORCH_INDEX)"; want="$(TORCH)"; build="$$want"; \
	case "$$want" in auto|cpu|cuda) ;; *) echo "pand: TORCH=$$want: expected auto, cpu or cuda" >&2; exit 2;; esac; \
	if $(PY) -c "import torch, torchvision" 2>/dev/null; then \
	    echo "pand: keeping the torch already in $(VENV) (make clean to choose again)"; exit 0; \
	fi; \
	if [ -n "$$index" ]; then \
	    echo "pand: installing torch from TORCH_INDEX=$$index"; \
	else \
	    if [ "$$want" = auto ]; then \
	        if nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then build=cuda; else build=cpu; fi; \
	    fi; \
	    if [ "$$build" = cuda ]; then \
	        if [ "$$want" = auto ]; then echo "pand: GPU found (nvidia-smi -L)."; fi; \
	        echo "pand: installing torch's default build from pip's index (the CUDA build on Linux x86_64:" \
	             ".venv about 6 GB)"; \
	    elif $(PY) -c "$$TORCH_PROBE" "$(TORCH_CPU_INDEX)"; then \
	        if [ "$$want" = auto ]; then echo "pand: no GPU (nvidia-smi -L lists none)."; fi; \
	        echo "pand: installing the CPU build of torch from $(TORCH_CPU_INDEX) (.venv about 1.4 GB)"; \
	        index="$(TORCH_CPU_INDEX)"; \
	    elif [ "$$want" = cpu ]; then \
	        echo "pand: TORCH=cpu, but the CPU build's index cannot be reached. Give TORCH_INDEX=<url> of an index" \
	             "or mirror with torch's CPU wheels, or TORCH=cuda to accept the default build." >&2; \
	        exit 1; \
	    else \
	        echo "pand: no GPU, and the CPU build of torch cannot be downloaded from there. Falling back to the"; \
	        echo "pand: default build of pip's index: on Linux x86_64 the CUDA build, a .venv of about 6 GB instead"; \
	        echo "pand: of 1.4 GB (5 GB more disk and download). It runs on the CPU all the same. To avoid it:"; \
	        echo "pand: make clean, then make ... TORCH_INDEX=<an index or mirror with torch's CPU wheels>."; \
	    fi; \
	fi; \
	if [ -n "$$index" ]; then $(PIP) install --no-compile --index-url "$$index" $(TORCH_REQS); \
	else $(PIP) install --no-compile $(TORCH_REQS); fi
	$(PIP) freeze | grep -E '^(torch|torchvision)==' > $(TORCH_PIN) || true
	@echo "pand: torch in $(VENV): $$(tr '\n' ' ' < $(TORCH_PIN))"
	touch $(TORCH_STAMP)

torch: $(TORCH_STAMP)

$(DEMO_STAMP): pyproject.toml $(TORCH_STAMP)
	$(PIP) install -q --no-compile -c $(TORCH_PIN) -e .
	$(COMPILE)
	touch $(DEMO_STAMP)

$(TEST_STAMP): pyproject.toml $(TORCH_STAMP)
	$(PIP) install -q --no-compile -c $(TORCH_PIN) -e ".[test]"
	$(COMPILE)
	touch $(TEST_STAMP)

install: $(DEMO_STAMP)
install-test: $(TEST_STAMP)

# Fashion-MNIST from Debian's package where apt is usable; otherwise pand downloads it (data.download=true).
fashion-mnist:
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null \
	    && [ "$$(id -u)" = 0 ]; then apt-get install -y -q dataset-fashion-mnist >/dev/null || true; fi

demo: $(DEMO_STAMP) fashion-mnist
	$(VENV)/bin/pand quickstart --out runs/quickstart --download

test: $(TEST_STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
