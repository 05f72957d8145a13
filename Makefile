# nibble: every target sets up .venv by itself on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help train test lint sim serve synth bitstream flash bench-numerics bench-system \
	bench-train clean

help:
	@echo "nibble: 4-bit neural-network training on open FPGAs"
	@echo ""
	@echo "  make train            train the digits MLP in 4 bits on the simulated device, beside fp32"
	@echo "  make test             lint and run the whole test suite"
	@echo "  make lint             ruff"
	@echo "  make sim              cocotb suites on Verilator (also part of make test)"
	@echo "  make serve            build (cached) and serve the simulated device on a TCP socket"
	@echo "  make synth            datapath through yosys/nextpnr for UP5K and ECP5-85F"
	@echo "  make bitstream BOARD=icebreaker|ulx3s-85f   board bitstream -> build/BOARD/"
	@echo "  make flash BOARD=...  program the board with openFPGALoader"
	@echo "  make bench-numerics   4-bit vs fp32 training benchmark -> build/bench/"
	@echo "  make bench-system     simulated device: speed, array utilization, link efficiency"
	@echo "  make bench-train      Fashion-MNIST on the device: accuracy, link bytes, projections"
	@echo "  make clean            remove build/ (keeps .venv)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

SYNTH_STAMP := $(VENV)/.installed-synth

$(SYNTH_STAMP): pyproject.toml $(STAMP)
	$(PY) -m pip install --quiet -e '.[synth,dev]'
	@touch $@

train: $(STAMP)
	$(VENV)/bin/nibble train $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

sim: $(STAMP)
	$(PY) -m sim.runner $(ARGS)

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

clean:
	rm -rf build
