# dtm_ds — every target sets itself up: `make test` and `make demo` work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
SYS_PKGS := pkg-config libturbojpeg0-dev libopencv-dev numactl dataset-fashion-mnist
STAMP := $(VENV)/.installed
# the launcher; a machine with DeepSpeed installed elsewhere: make -o $(STAMP) pretrain DEEPSPEED="python3 -m deepspeed.launcher.runner"
DEEPSPEED ?= $(VENV)/bin/deepspeed
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
# No DS_ACCELERATOR here: dtm_ds/devices.py decides (DS_ACCELERATOR when set, else CUDA when present, else CPU).

.PHONY: setup sysdeps test test-faults mutants lint format bench clean demo pretrain reproduce data-imagenet check-eval-args \
	eval-imagenet eval-inat18 eval-inat19 eval-fgvc eval-linear eval-knn eval-ade20k

setup: $(STAMP)

# System libraries FFCV builds and links against, numactl, and the demo's Fashion-MNIST.
sysdeps:
	@missing=$$(for p in $(SYS_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing system packages: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "missing system packages; run: sudo apt-get install -y $$missing"; exit 1; \
	  fi; \
	fi

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory sysdeps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e ".[seg,dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The fault-injection suite with its slow cases (hung rank, 1,000-step 2-rank load run, kill fuzz, the GPU check rehearsal): ~23 min
test-faults: $(STAMP)
	$(PY) -m pytest tests/faults -m "" -s $(PYTEST_ARGS)
	$(PY) -m pytest tests -m faults_slow --ignore=tests/faults $(PYTEST_ARGS)  # the slow cases outside tests/faults

# Mutation testing (tests/mutants.py): every one-line defect in the list must make its tests fail (~15 min)
mutants: $(STAMP)
	$(PY) -m tests.mutants $(MUTANTS_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	set -e; for f in bench/bench_*.py; do m=$$(basename $$f .py); echo "== bench.$$m"; $(PY) -m bench.$$m; done

# Pretraining on GPUs: make pretrain MODEL=vitb DATA=train.beton TEACHER_WEIGHTS=ViT-B-16.pt NGPUS=8
# (TEACHER overrides the preset's teacher, e.g. TEACHER=clip:ViT-L-14; tiny keeps its weight-free pixels one)
MODEL ?= vitb
NGPUS ?= 1
# DS_CONFIG empty: the device's default (GPU: ds_configs/zero2_bf16.json; CPU: ds_configs/cpu.json)
DS_CONFIG ?=
TEACHER ?=
OUT ?= outputs/pretrain_$(MODEL)
pretrain: $(STAMP)
	@test -n "$(DATA)" || { echo "error: set DATA=<train .beton> (make data-imagenet writes one)"; exit 2; }
	@test -z "$(TEACHER_WEIGHTS)" -o -f "$(TEACHER_WEIGHTS)" || { echo "error: TEACHER_WEIGHTS=$(TEACHER_WEIGHTS) does not exist"; exit 2; }
	$(DEEPSPEED) $(if $(HOSTFILE),--hostfile $(HOSTFILE),--num_gpus $(NGPUS)) dtm_ds/train.py \
	  $(if $(DS_CONFIG),--ds_config $(DS_CONFIG)) --model $(MODEL) --output_dir $(OUT) --data.path=$(DATA) \
	  $(if $(TEACHER),--teacher.name=$(TEACHER)) $(if $(TEACHER_WEIGHTS),--teacher.weights=$(TEACHER_WEIGHTS)) $(ARGS)

# ImageNet -> FFCV: make data-imagenet IMAGENET=/data/imagenet OUT_DATA=data
OUT_DATA ?= data
data-imagenet: $(STAMP)
	@test -n "$(IMAGENET)" || { echo "set IMAGENET=<root with train/ and val/>"; exit 2; }
	$(PY) -m data_prep.write_ffcv $(IMAGENET) --split train --out $(OUT_DATA)/imagenet_train.beton \
	  --max_side 512 --write_mode proportion --compress_probability 0.5 --workers $$(nproc)
	$(PY) -m data_prep.write_ffcv $(IMAGENET) --split val --out $(OUT_DATA)/imagenet_val.beton \
	  --max_side 512 --write_mode jpg --workers $$(nproc)

# Downstream: CKPT = a pretraining run directory or an export; DATA = the dataset root (README: layouts)
# EVAL_DS empty: the device's default, as DS_CONFIG
EVAL_DS ?=
EVAL_OUT ?= outputs/eval
FT = $(DEEPSPEED) $(if $(HOSTFILE),--hostfile $(HOSTFILE),--num_gpus $(NGPUS)) eval/finetune.py \
  --encoder $(CKPT) --data $(DATA) $(if $(EVAL_DS),--ds_config $(EVAL_DS)) $(ARGS)
check-eval-args:
	@test -n "$(CKPT)" -a -n "$(DATA)" || { echo "set CKPT=<run dir or export> DATA=<dataset root>"; exit 2; }
eval-imagenet: $(STAMP) check-eval-args
	$(FT) --dataset imagenet --output_dir $(EVAL_OUT)/imagenet
eval-inat18: $(STAMP) check-eval-args
	$(FT) --dataset inat18 --output_dir $(EVAL_OUT)/inat18
eval-inat19: $(STAMP) check-eval-args
	$(FT) --dataset inat19 --output_dir $(EVAL_OUT)/inat19
eval-fgvc: $(STAMP) check-eval-args
	@case "$(DATASET)" in cub|cars|aircraft|flowers|pets) ;; *) echo "DATASET=cub|cars|aircraft|flowers|pets"; exit 2;; esac
	$(FT) --dataset $(DATASET) --output_dir $(EVAL_OUT)/$(DATASET)
EVAL_SET ?= imagenet
eval-linear: $(STAMP) check-eval-args
	$(PY) eval/linear.py --encoder $(CKPT) --train $(DATA) --val $(DATA) --dataset $(EVAL_SET) $(ARGS)
eval-knn: $(STAMP) check-eval-args
	$(PY) eval/knn.py --encoder $(CKPT) --train $(DATA) --val $(DATA) --dataset $(EVAL_SET) $(ARGS)

# ADE20K: make eval-ade20k CKPT=outputs/pretrain_vitb DATA=/data/ADEChallengeData2016 NGPUS=8 [ARGS=--amp=bf16]
SEG = eval/seg/train.py --encoder $(CKPT) --data $(DATA) --output_dir $(EVAL_OUT)/ade20k $(ARGS)
eval-ade20k: $(STAMP) check-eval-args
	$(if $(filter 1,$(NGPUS)),$(PY) $(SEG),$(VENV)/bin/torchrun --nproc_per_node $(NGPUS) $(SEG) --launcher pytorch)

# The paper's chain (docs/REPRODUCE.md): pretraining -> ImageNet fine-tuning -> ADE20K -> transfers, resumable:
# make reproduce MODEL=vitb DATA=/data/imagenet TEACHER_WEIGHTS=ViT-B-16.pt NGPUS=8 [ADE20K=...] [INAT18=...] [CUB=...]
TRANSFER_SETS := INAT18 INAT19 CUB CARS AIRCRAFT FLOWERS PETS
lower = $(shell echo $(1) | tr A-Z a-z)
reproduce: $(STAMP)
	@test -n "$(DATA)" || { echo "error: set DATA=<ImageNet root with train/ and val/>"; exit 2; }
	$(PY) eval/reproduce.py --model $(MODEL) --data $(DATA) --ngpus $(NGPUS) $(if $(DS_CONFIG),--ds_config $(DS_CONFIG)) \
	  $(if $(TEACHER_WEIGHTS),--teacher_weights $(TEACHER_WEIGHTS)) $(if $(HOSTFILE),--hostfile $(HOSTFILE)) \
	  $(if $(ADE20K),--ade20k $(ADE20K)) $(foreach t,$(TRANSFER_SETS),$(if $($(t)),--$(call lower,$(t)) $($(t)))) $(ARGS)

demo: $(STAMP)
	$(PY) -m dtm_ds.demo --out outputs/demo

clean:
	rm -rf $(VENV) .cache build *.egg-info
