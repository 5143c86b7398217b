# The two quick-start commands: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: demo test bench clean

$(PY): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(PY)

# `make demo DATA=fashion-mnist` runs it on Fashion-MNIST (apt-get install dataset-fashion-mnist).
demo: $(PY)
	$(PY) -m examples.demo $(if $(DATA),--data $(DATA))

test: $(PY)
	$(PY) -m pytest -n 2 -q tests

# Speed figures (a few minutes each; benchmarks.quantize about 10); benchmarks.steps_to_accuracy
# and examples.qat (accuracy, about 25 minutes) are the long ones, run them apart.
bench: $(PY)
	KERAS_BACKEND=tensorflow $(PY) -m benchmarks.layer_speed
	KERAS_BACKEND=jax $(PY) -m benchmarks.layer_speed
	KERAS_BACKEND=tensorflow $(PY) -m benchmarks.training_speed
	KERAS_BACKEND=jax $(PY) -m benchmarks.training_speed
	KERAS_BACKEND=tensorflow $(PY) -m benchmarks.fold
	KERAS_BACKEND=tensorflow $(PY) -m benchmarks.export
	$(PY) -m benchmarks.quantize

clean:
	rm -rf $(VENV) *.egg-info demo_output
