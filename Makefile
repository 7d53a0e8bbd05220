# The book's commands. Each target sets up .venv itself on first use.
#   make book       build the HTML book into _build/html (warnings are errors)
#   make test       unit tests + strict nbval over every notebook, one pytest run
#   make notebooks  re-execute every notebook in place (refresh stored outputs)
#   make test-portable  nbval over every notebook under other CPU kernels (SSE4.1, AVX2 + MKL,
#                   AVX-512 where the CPU has it)
#   make benchmarks time the reference code against PyTorch / scikit-learn / Captum
#   make benchmark-tables  refresh the tables of the benchmark appendix
#   make lint       ruff over the package, the tests, the tools and the notebooks
#   make lock       regenerate the lock files in requirements/ from pyproject.toml
#   make test-browser  build the book, open every page in headless Chromium with no network
#                      and check what it shows (SCREENSHOTS=1: PNGs in _build/screenshots)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
JOBS   ?= 2

# Stored outputs are produced and checked on the CPU with a fixed hash seed; a reader's
# own Jupyter session is free to use a GPU (companion.device.get_device()).
export PYTHONHASHSEED := 0
export COMPANION_DEVICE ?= cpu

.PHONY: all book test test-portable test-browser notebooks benchmarks benchmark-tables lint lock clean

all: test book

# PyTorch is installed first and on its own: its CUDA build when an NVIDIA GPU is present
# (nvidia-smi found), otherwise its CPU build from PyTorch's CPU index (PyPI's Linux wheel
# is the CUDA build, several GB). Its dependencies come from the lock files.
TORCH_VERSION   := $(shell sed -n 's/^torch==\([0-9.]*\).*/\1/p' requirements/torch.txt)
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
LOCKS           := requirements/runtime.txt requirements/test.txt requirements/book.txt

$(STAMP): $(LOCKS) requirements/torch.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is needed, found " + sys.version)'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "make: nvidia-smi found: installing PyTorch $(TORCH_VERSION) from PyPI (CUDA build)"; \
	  $(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION); \
	else \
	  echo "make: no NVIDIA GPU (nvidia-smi not found): installing PyTorch $(TORCH_VERSION)'s CPU build from $(TORCH_CPU_INDEX)"; \
	  $(BIN)/python -m pip install --quiet --no-deps torch==$(TORCH_VERSION) --index-url $(TORCH_CPU_INDEX); \
	fi
	$(BIN)/python -m pip install --quiet $(foreach f,$(LOCKS),-r $(f))
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

book: $(STAMP)
	$(BIN)/jupyter-book build --all -W -n --keep-going .

# KERNELS=NAME runs everything under one of the CPU-kernel variants of tools/portability.py
# (CI runs `make test KERNELS=avx2-mkl`); NOTEBOOK_TIMINGS=file.json keeps the timings.
KERNELS ?=
test: $(STAMP)
	$(if $(KERNELS),env $$($(BIN)/python tools/portability.py --print-env $(KERNELS))) \
	  $(BIN)/python -m pytest -n $(JOBS) --dist loadscope

# The notebooks again under the CPU code paths of other readers' machines
# (tools/portability.py): they must pass under every one.
# VARIANTS="a b" runs only those (default: every variant this CPU can run).
VARIANTS ?=
test-portable: $(STAMP)
	$(BIN)/python tools/portability.py --jobs $(JOBS) $(foreach v,$(VARIANTS),--variant $(v))

# Browser check: Playwright (requirements/browser.txt) drives Debian's chromium, which is
# installed with apt-get when missing (as root, or through sudo), with a small Chinese font
# (fonts-wqy-microhei, 1.6 MB) so that the glossary's terms are not drawn as empty boxes.
BROWSER_STAMP := $(VENV)/.installed-browser
CHROMIUM      ?= $(shell command -v chromium || echo /usr/bin/chromium)
SUDO          := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(BROWSER_STAMP): requirements/browser.txt $(STAMP)
	$(BIN)/python -m pip install --quiet -r requirements/browser.txt
	touch $(BROWSER_STAMP)

test-browser: $(BROWSER_STAMP)
	@{ test -x $(CHROMIUM) && fc-list :lang=zh | grep -q .; } || { $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends \
	  chromium fonts-wqy-microhei; }
	$(BIN)/python tools/vendor_js.py --check
	$(MAKE) book
	rm -rf _build/screenshots
	timeout --kill-after=30 1200 $(BIN)/python tools/browser_check.py _build/html \
	  --chromium $(CHROMIUM) $(if $(SCREENSHOTS),--screenshots _build/screenshots)

notebooks: $(STAMP)
	$(BIN)/python tools/execute_notebooks.py $(NOTEBOOKS)

benchmarks: $(STAMP)
	$(BIN)/python -m companion.benchmarks

# The tables of the benchmark appendix (run on an otherwise idle machine).
benchmark-tables: $(STAMP)
	$(BIN)/python -m companion.benchmarks --device cpu --threads 1 --markdown > book/appendix/benchmarks_cpu_1thread.md
	$(BIN)/python -m companion.benchmarks --device cpu --threads 2 --markdown > book/appendix/benchmarks_cpu_2threads.md

lint: $(STAMP)
	$(BIN)/ruff check companion tests tools book conftest.py

# The lock files, one per purpose, generated by uv from pyproject.toml: runtime (the package
# and its serve/export/tokens extras), test (the oracles and the test tools), book
# (Jupyter Book, JupyterLab), browser (Playwright). Existing pins are kept unless
# UPGRADE=1. PyTorch itself is left out (the install above picks its build); its
# dependencies are resolved against its CPU wheels (TORCH_WHEELS: a page or a folder).
TORCH_WHEELS ?= $(TORCH_CPU_INDEX)/torch/
UV_COMPILE    = $(BIN)/uv pip compile --quiet --python $(BIN)/python --no-emit-package torch -c requirements/torch.txt \
                --find-links $(TORCH_WHEELS) --custom-compile-command "make lock" \
                $(if $(UPGRADE),--upgrade) pyproject.toml
lock: $(STAMP)
	$(BIN)/python -m pip install --quiet uv==0.13.8
	$(UV_COMPILE) --extra serve --extra export --extra tokens -o requirements/runtime.txt
	$(UV_COMPILE) --extra oracles --extra test -c requirements/runtime.txt -o requirements/test.txt
	$(UV_COMPILE) --extra book -c requirements/runtime.txt -c requirements/test.txt \
	  -o requirements/book.txt
	$(UV_COMPILE) --extra browser -c requirements/runtime.txt -o requirements/browser.txt

clean:
	rm -rf _build
