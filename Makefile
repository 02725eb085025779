# Two commands do everything on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# torch and torchvision pinned together: timm needs torchvision, and a torchvision
# built for another torch fails to import.
TORCH := torch==2.14.1 torchvision==0.29.1
APT_PKGS := xvfb xauth libgl1 libegl1 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 \
	libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 \
	libxcb-shape0 libxcb-cursor0 libdbus-1-3 libfontconfig1

.PHONY: demo test venv system-deps benchmarks model clean

# pip's CUDA build of torch (the one torchvision on this registry is built against) needs about
# 6 GB in the venv; say so plainly instead of failing halfway with "No space left on device".
NEED_GB ?= 7

$(STAMP): pyproject.toml
	@free_gb=$$(( $$(df -Pk . | awk 'NR==2 {print $$4}') / 1048576 )); \
	if [ "$$free_gb" -lt $(NEED_GB) ] && [ ! -e $(PY) ]; then \
		echo "make: the virtual environment needs about $(NEED_GB) GB free on $$(df -P . | awk 'NR==2 {print $$6}'), only $$free_gb GB is free" >&2; \
		exit 1; \
	fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# Xvfb and the X/GL libraries Qt needs; installed when we are root and they are missing.
system-deps:
	@if ! command -v Xvfb >/dev/null 2>&1 || ! ldconfig -p | grep -q libxkbcommon-x11; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS) >/dev/null; \
		else echo "Xvfb missing: install it (apt-get install $(APT_PKGS)) for the GUI tests"; fi; \
	fi

test: venv system-deps
	$(PY) -m pytest -q $(PYTEST_ARGS)

# With a display: the viewer opens. Without one: a virtual X server renders the same window to
# out/demo/screenshot.png and the report is printed.
demo: venv system-deps
	@if [ -n "$$DISPLAY" ]; then \
		$(PY) -m napari_hdmil.demo $(DEMO_ARGS); \
	else \
		xvfb-run -a -s "-screen 0 1600x1000x24" $(PY) -m napari_hdmil.demo \
			--screenshot out/demo/screenshot.png --dock-shot out/demo/widget.png --out out/demo $(DEMO_ARGS); \
	fi

model: venv
	$(PY) -m hdmil.cli recipe demo --out out/demo-model --install

# Every benchmark in turn, each printing its table (the viewer starts its own Xvfb when needed).
BENCHMARKS := viewer reading features allocator hierarchical peers review_open accuracy batch slpd
benchmarks: venv system-deps
	@for b in $(BENCHMARKS); do echo "== benchmarks/$$b.py"; $(PY) benchmarks/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) out .pytest_cache
