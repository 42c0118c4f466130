# Two commands do everything on a fresh machine: `make demo` and `make test` (both set up .venv when needed).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROMPT ?= It is a truth universally acknowledged

.PHONY: setup demo demo-executorch demo-coreml test test-all clean kernels cross-tools app-tools

setup: $(STAMP) kernels

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (pocketllm needs Python 3.11)"; exit 2; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e ".[dev]"
	touch $(STAMP)

# ExecuTorch kernels (kernels/): one shared library built against the installed executorch wheel.
KERNEL_LIB := kernels/build/libpocketllm_kernels.so
kernels: $(KERNEL_LIB)

$(KERNEL_LIB): $(STAMP) kernels/CMakeLists.txt $(wildcard kernels/*.cpp kernels/*.h)
	cmake -S kernels -B kernels/build -DCMAKE_PREFIX_PATH="$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/executorch" >/dev/null
	cmake --build kernels/build -j2

# arm64 cross compiler + user-mode qemu: the test suite then also runs the NEON (phone) path of the any4 kernel.
cross-tools:
	@command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null || \
	  { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO apt-get install -y -q g++-aarch64-linux-gnu qemu-user >/dev/null; }

# Kotlin/JVM toolchain for android_demo/core's tests (Debian: kotlin 1.3, JUnit 4, Android's org.json) and adb for
# `pocketllm push android`. Without them tests/apps skips the Kotlin tests with a reason.
app-tools:
	@command -v kotlinc >/dev/null && command -v adb >/dev/null && [ -f /usr/share/java/junit4.jar ] && \
	  [ -f /usr/share/java/com.android.json.jar ] || \
	  { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO apt-get install -y -q kotlin junit4 libandroid-json-java adb >/dev/null; }

demo: setup
	$(BIN)/pocketllm generate --checkpoint models/tiny-austen --prompt "$(PROMPT)" --greedy --max-new-tokens 80
	$(MAKE) --no-print-directory demo-executorch
	$(MAKE) --no-print-directory demo-coreml

# ExecuTorch: tiny-austen -> any4 .pte bundle (re-exported only when the checkpoint changes), parity, generation.
DEMO_BUNDLE := out/tiny-austen-any4
demo-executorch: setup $(DEMO_BUNDLE)/manifest.json
	$(BIN)/pocketllm parity $(DEMO_BUNDLE)
	$(BIN)/pocketllm generate --engine executorch --bundle $(DEMO_BUNDLE) --prompt "$(PROMPT)" --greedy --max-new-tokens 80

$(DEMO_BUNDLE)/manifest.json: models/tiny-austen/model.safetensors models/tiny-austen/config.json
	$(BIN)/pocketllm export --checkpoint models/tiny-austen --target executorch --quant any4 --out $(DEMO_BUNDLE) --force

# Core ML: tiny-austen -> any4 .mlpackage bundle (512-token context: InfLLM v2 goes sparse past 384 tokens), parity
# through the MIL interpreter in fp32 and fp16 modes (Core ML itself runs only on Apple devices), generation.
COREML_BUNDLE := out/tiny-austen-coreml
demo-coreml: setup $(COREML_BUNDLE)/manifest.json
	$(BIN)/pocketllm parity $(COREML_BUNDLE)
	$(BIN)/pocketllm generate --engine coreml --bundle $(COREML_BUNDLE) --prompt "$(PROMPT)" --greedy --max-new-tokens 80

$(COREML_BUNDLE)/manifest.json: models/tiny-austen/model.safetensors models/tiny-austen/config.json
	$(BIN)/pocketllm export --checkpoint models/tiny-austen --target coreml --quant any4 --max-context 512 --out $(COREML_BUNDLE) --force

test: setup
	$(BIN)/python -m pytest -m "not slow"

test-all: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build out .pytest_cache
