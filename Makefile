# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# torch/torchvision are pinned to the builds that install from this machine's disk.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: test demo install clean

$(VENV)/.installed: pyproject.toml
	# the browser test drives Debian's chromium (never a browser downloaded by playwright)
	command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	command -v chromium >/dev/null 2>&1 || echo "note: the browser test needs Debian's chromium (sudo apt-get install chromium)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_PINS)
	$(PIP) install --quiet -e ".[test,demo,serve]" $(TORCH_PINS)
	touch $@

install: $(VENV)/.installed

test: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest

demo: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/vitp demo --out runs/demo

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
