# nibble: every target sets up .venv by itself on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TEST_STAMP  := $(VENV)/.installed-test
SYNTH_STAMP := $(VENV)/.installed-synth

.DEFAULT_GOAL := help
.PHONY: help train test test-all lint sim serve synth bitstream flash bench-numerics \
	bench-system bench-train bench-density bench-link clean

help:
	@echo "nibble: 4-bit neural-network training on open FPGAs"
	@echo ""
	@echo "  make train            train the digits MLP in 4 bits on the simulated device, beside fp32"
	@echo "  make test             lint and the fast test tier (minutes)"
	@echo "  make test-all         the long test volumes (cocotb, fuzzing, the Verilator system model)"
	@echo "  make lint             ruff"
	@echo "  make sim              cocotb suites on Verilator, full volumes, with a summary"
	@echo "  make serve            build (cached) and serve the simulated device on a TCP socket"
	@echo "  make synth            datapath through yosys/nextpnr for UP5K and ECP5-85F"
	@echo "  make bitstream BOARD=icebreaker|ulx3s-85f   board bitstream -> build/BOARD/"
	@echo "  make flash BOARD=...  program the board with openFPGALoader"
	@echo "  make bench-numerics   4-bit vs fp32 training benchmark -> build/bench/"
	@echo "  make bench-system     simulated device: speed, array utilization, link efficiency"
	@echo "  make bench-train      Fashion-MNIST on the device: accuracy, link bytes, projections"
	@echo "  make bench-density    nibble's PE against an FP16 PE on both FPGAs (the paper's 7.3x)"
	@echo "  make bench-link       the native USB link on the RTL: stream rate, round trip"
	@echo "  make clean            remove build/ (keeps .venv)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	@touch $@

$(TEST_STAMP): pyproject.toml $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,dev]'
	@touch $@

$(SYNTH_STAMP): pyproject.toml $(STAMP)
	$(PY) -m pip install --quiet -e '.[synth]'
	@touch $@

train: $(STAMP)
	$(VENV)/bin/nibble train $(ARGS)

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .

# The fast tier: every module, small volumes (tests marked `long` are left to test-all).
test: lint
	$(PY) -m pytest -q -m "not long" $(PYTEST_ARGS)

# The long volumes: >= 100,000 vectors per cocotb suite, 100,000 fuzz frames, 10,000
# fault-injection frames, everything on the Verilator system model.
test-all: $(TEST_STAMP)
	$(PY) -m pytest -q -m long $(PYTEST_ARGS)

sim: $(TEST_STAMP)
	$(PY) -m nibble.sim.runner $(ARGS)

synth: $(SYNTH_STAMP)
	$(VENV)/bin/nibble synth --docs docs/results.md $(ARGS)

serve: $(STAMP)
	$(VENV)/bin/nibble sim serve $(ARGS)

BOARD ?= icebreaker

bitstream: $(SYNTH_STAMP)
	$(VENV)/bin/nibble bitstream --board $(BOARD) --docs docs/results.md $(ARGS)

flash: $(SYNTH_STAMP)
	$(VENV)/bin/nibble flash --board $(BOARD) $(ARGS)

bench-system: $(STAMP)
	$(VENV)/bin/nibble bench system --docs docs/results.md $(ARGS)

bench-numerics: $(STAMP)
	$(VENV)/bin/nibble bench numerics --docs docs/results.md $(ARGS)

bench-train: $(STAMP)
	$(VENV)/bin/nibble bench train --docs docs/results.md $(ARGS)

bench-link: $(STAMP)
	$(VENV)/bin/nibble bench link --docs docs/results.md $(ARGS)

bench-density: $(SYNTH_STAMP)
	$(VENV)/bin/nibble bench density --docs docs/results.md $(ARGS)

clean:
	rm -rf build
