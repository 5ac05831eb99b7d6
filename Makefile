# `make train` and `make test` set everything up first (idempotent: seconds when already done).
PY := .venv/bin/python
TRAIN_ARGS ?= --env-id PickCube-v1 --num-demos 5
TEST_WORKERS ?= 2

.PHONY: setup train test
setup:
	bash scripts/setup.sh

train: setup
	$(PY) rfcl.py $(TRAIN_ARGS)

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope tests
