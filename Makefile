# The book's commands. Each target sets up .venv itself on first use.
#   make book       build the HTML book into _build/html (warnings are errors)
#   make test       unit tests + strict nbval over every notebook, one pytest run
#   make notebooks  re-execute every notebook in place (refresh stored outputs)
#   make test-portable  nbval over every notebook under other CPU kernels (AVX2, none, MKL)
#   make benchmarks time the reference code against PyTorch / scikit-learn / Captum
#   make benchmark-tables  refresh the tables of the benchmark appendix
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

.PHONY: all book test test-portable test-browser notebooks benchmarks benchmark-tables lint clean

all: test book

$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is needed, found " + sys.version)'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

book: $(STAMP)
	$(BIN)/jupyter-book build --all -W -n --keep-going .

test: $(STAMP)
	$(BIN)/python -m pytest -n $(JOBS) --dist loadscope

# The notebooks again under the CPU code paths of other readers' machines
# (tests/portability.py): they must pass under every one.
test-portable: $(STAMP)
	$(BIN)/python tests/portability.py --jobs $(JOBS)

# Browser check: Playwright (requirements-browser.txt) drives Debian's chromium, which is
# installed with apt-get when missing (as root, or through sudo), with a small Chinese font
# (fonts-wqy-microhei, 1.6 MB) so that the glossary's terms are not drawn as empty boxes.
BROWSER_STAMP := $(VENV)/.installed-browser
CHROMIUM      ?= $(shell command -v chromium || echo /usr/bin/chromium)
SUDO          := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(BROWSER_STAMP): requirements-browser.txt $(STAMP)
	$(BIN)/python -m pip install --quiet -r requirements-browser.txt
	touch $(BROWSER_STAMP)

test-browser: $(BROWSER_STAMP)
	@{ test -x $(CHROMIUM) && fc-list :lang=zh | grep -q .; } || { $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends \
	  chromium fonts-wqy-microhei; }
	$(BIN)/python tests/vendor_js.py --check
	$(MAKE) book
	rm -rf _build/screenshots
	timeout --kill-after=30 1200 $(BIN)/python tests/browser_check.py _build/html \
	  --chromium $(CHROMIUM) $(if $(SCREENSHOTS),--screenshots _build/screenshots)

notebooks: $(STAMP)
	$(BIN)/python tests/execute_notebooks.py $(NOTEBOOKS)

benchmarks: $(STAMP)
	$(BIN)/python -m companion.benchmarks

# The tables of the benchmark appendix (run on an otherwise idle machine).
benchmark-tables: $(STAMP)
	$(BIN)/python -m companion.benchmarks --device cpu --threads 1 --markdown > book/appendix/benchmarks_cpu_1thread.md
	$(BIN)/python -m companion.benchmarks --device cpu --threads 2 --markdown > book/appendix/benchmarks_cpu_2threads.md

lint: $(STAMP)
	$(BIN)/ruff check companion tests book

clean:
	rm -rf _build
