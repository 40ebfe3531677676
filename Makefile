# Two commands on a fresh machine (Python >= 3.11):
#   make serve   install into .venv, fetch the default model, start the server on :8000
#   make test    install the dev tools too, then lint, type-check and run every test
# torch==2.13.0 is installed first: the project asks for torch>=2.4,<3, and with no torch present pip would
# resolve that to the newest release and several GB of CUDA wheels. (On a GPU machine PyPI's 2.13.0 wheel is
# the CUDA build; on these CPU machines pip finds the local CPU build.)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0
WHISPER_REFERENCE := openai-whisper==20250625

.PHONY: install serve test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e .
	touch $@

# The reference implementation (for parity tests) with --no-deps: what it needs is in the dev extras, and its own
# triton requirement would be another large wheel beside the one the fused-kernel tests run in the interpreter.
# perf_analyzer (Triton's load tool, for the tests of the Triton APIs) is fetched as well as it can be: where it
# cannot be, its tests skip and say why.
$(VENV)/.dev-installed: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps $(WHISPER_REFERENCE)
	bash bench/perf_analyzer.sh fetch || echo "perf_analyzer was not fetched; its tests will skip"
	touch $@

install: $(VENV)/.installed

serve: $(VENV)/.installed
	$(BIN)/halkspeech models pull $${HALKSPEECH_MODEL__DEFAULT:-$${WHISPER__MODEL:-base}}
	$(BIN)/halkspeech serve

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
