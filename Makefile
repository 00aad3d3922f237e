# Two commands on a fresh machine: `make demo` and `make test` (both install first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Installed only when the interpreter has no torch (a machine's own CUDA torch is reused through
# --system-site-packages). These two lie on this project's CI disk; a bare `torch` would download GBs.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_OUT ?= runs/demo
DEMO_STEPS ?= 300

.PHONY: install test test-fast demo bench info clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv --system-site-packages $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)') (not reinstalled)"; \
	else \
		$(PY) -m pip install $(TORCH_SPEC); \
	fi
	$(PY) -m pip install -e '.[test]'
	touch $@

test: install
	$(PY) -m pytest tests -q -ra

demo: install
	$(VENV)/bin/beit-fast pretrain --preset tiny --data builtin --max-steps $(DEMO_STEPS) --out $(DEMO_OUT) --seed 0

bench: install
	$(PY) -m pytest bench -q -s --benchmark-columns=median,ops,rounds

info: install
	$(VENV)/bin/beit-fast info

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .benchmarks runs
