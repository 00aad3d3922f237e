# Two commands on a fresh machine: `make demo` and `make test` (both install first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Installed only when the interpreter has no torch (a machine's own CUDA torch is reused through
# --system-site-packages). These two lie on this project's CI disk; a bare `torch` would download GBs.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEEPSPEED_SPEC ?= 'deepspeed>=0.19.8,<0.20'
DEMO_OUT ?= runs/demo
DEMO_STEPS ?= 300
DEMO_FT_STEPS ?= 1200
DEMO_SEED ?= 0
# One fine-tuning recipe for both demo runs (from the demo's pretraining and from scratch): only --init differs. It is
# `finetune --recipe auto`, i.e. the small-network recipe for tiny (train/recipes.py: no colour jitter, mixup / cutmix,
# RandAugment, erasing, layer decay, smoothing or drop path; the whole image in training and evaluation; lr 1e-3 at
# batch 32). The two runs go side by side with one torch thread each (~1.5x the images per second of one after the
# other on 2 cores): the tiny ViT needs some 20-40k images to leave chance on builtin (README "Fine-tuning").
DEMO_FT = --data builtin --max-steps $(DEMO_FT_STEPS) --batch-size 32 --num-images 2048 --eval-every 400 \
	--seed $(DEMO_SEED) --num-workers 0 --overwrite

.PHONY: install test demo study bench bench-smoke gpu-wheels info clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv --system-site-packages $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)') (not reinstalled)"; \
	else \
		$(PY) -m pip install $(TORCH_SPEC); \
	fi
	$(PY) -m pip install -e '.[test]'
	@# DeepSpeed (the ZeRO engine and its tests): an sdist whose build imports torch, so no build isolation
	@# (isolation would download a second torch). Its C++ ops compile on first use, not here.
	$(PY) -m pip install --no-build-isolation $(DEEPSPEED_SPEC)
	touch $@

test: install
	$(PY) -m pytest tests -q -ra

# A small dVAE tokenizer first (~1 min on 2 CPU cores), then BEiT pretraining on its tokens (~2 min), then fine-tuning
# on the builtin class labels from that pretraining and, with the same budget, from scratch (side by side, ~3.5 min),
# then the pretrained network's attention on its query's own shape against a random initialisation's; the last line
# compares them and says when a run did not learn.
demo: install
	$(VENV)/bin/beit-fast train-tokenizer --preset small --data builtin --out $(DEMO_OUT)/tokenizer --seed $(DEMO_SEED) \
		--overwrite
	$(VENV)/bin/beit-fast pretrain --preset tiny --data builtin --max-steps $(DEMO_STEPS) --out $(DEMO_OUT) \
		--seed $(DEMO_SEED) --tokenizer $(DEMO_OUT)/tokenizer/tokenizer.pt --overwrite
	@echo "fine-tuning from the demo pretraining and from scratch side by side (progress: $(DEMO_OUT)/finetune.log," \
		"$(DEMO_OUT)/scratch.log)"
	@OMP_NUM_THREADS=1 $(VENV)/bin/beit-fast finetune --init $(DEMO_OUT) $(DEMO_FT) --out $(DEMO_OUT)/finetune \
		> $(DEMO_OUT)/finetune.log 2>&1 & a=$$!; \
	OMP_NUM_THREADS=1 $(VENV)/bin/beit-fast finetune --init none --preset tiny $(DEMO_FT) --out $(DEMO_OUT)/scratch \
		> $(DEMO_OUT)/scratch.log 2>&1 & b=$$!; \
	wait $$a; ra=$$?; wait $$b; rb=$$?; \
	for r in finetune scratch; do echo "== $$r"; grep -v Warning $(DEMO_OUT)/$$r.log | tail -n 6; done; \
	[ $$ra -eq 0 ] && [ $$rb -eq 0 ]
	$(VENV)/bin/beit-fast evaluate $(DEMO_OUT)/finetune --data builtin --num-images 2048
	$(VENV)/bin/beit-fast attention-maps $(DEMO_OUT) --out $(DEMO_OUT)/attention.png
	@$(PY) -m beit_fast.train.demo $(DEMO_OUT)

# The paper's ablation table (Table 4) at the --quick budget: 7 variants x 2 seeds, pretrained, fine-tuned, probed,
# segmented, on builtin (~21 min on 2 CPU cores; README "Ablation study"). STUDY_ARGS adds or overrides options.
STUDY_OUT ?= runs/study
STUDY_ARGS ?=
study: install
	$(VENV)/bin/beit-fast study --quick --out $(STUDY_OUT) $(STUDY_ARGS)

bench: install
	$(PY) -m pytest bench -q -s --benchmark-columns=median,ops,rounds

# The kernel suites at tiny shapes on the CPU through the Triton interpreter (checks the code paths).
bench-smoke: install
	BEIT_BENCH_SMOKE=1 TRITON_INTERPRET=1 BENCH_OUT=runs/bench-smoke $(PY) -m pytest bench -q -s

# Wheels for an offline GPU machine (Python 3.12; bench/gpu_suite.sh installs whatever lies in .whl/): the fused
# linear+CE peers, the dall_e package (the tokenizer peer), and DeepSpeed (built here from its sdist, pure Python)
# with the dependencies the GPU image lacks (hjson, pydantic and its own; the image has msgpack, ninja, einops,
# py-cpuinfo, psutil).
gpu-wheels: install
	mkdir -p .whl
	$(PY) -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
		liger-kernel==0.8.5 cut-cross-entropy==25.1.1 dall-e==0.1 hjson pydantic annotated-types typing-inspection
	$(PY) -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
		"pydantic-core==$$($(PY) -m pip download --no-deps -q -d /tmp/pyd pydantic >/dev/null && \
		unzip -p /tmp/pyd/pydantic-*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p')"
	$(PY) -m pip wheel --no-deps --no-build-isolation -w .whl $(DEEPSPEED_SPEC)

info: install
	$(VENV)/bin/beit-fast info

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .benchmarks runs
