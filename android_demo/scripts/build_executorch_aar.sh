#!/usr/bin/env bash
# Build the ExecuTorch Android runtime (AAR) for arm64-v8a at the version pocketllm pins, from source with the NDK,
# with pocketllm's kernels (kernels/) linked whole-archive into its JNI library, so that bundles whose manifest lists
# `targets.executorch.requires_kernels` (InfLLM v2, lightning attention, any4) run in android_demo.
#
# Usage:
#   android_demo/scripts/build_executorch_aar.sh                 build (inputs below); writes OUTPUTS
#   android_demo/scripts/build_executorch_aar.sh --check         only check the inputs and tools, build nothing
#   android_demo/scripts/build_executorch_aar.sh --list-ops LIB  print the pocketllm ops a built kernel library
#                                                                registers (any architecture: .a or .so)
#   android_demo/scripts/build_executorch_aar.sh --kernels-json LIB OUT
#                                                                write the kernel list the app reads (OUT) for LIB
#
# Inputs (environment):
#   ANDROID_NDK       NDK root (contains build/cmake/android.toolchain.cmake). ExecuTorch's CI uses r28c; r27+ needed.
#   ANDROID_HOME      Android SDK root (ANDROID_SDK_ROOT also read) with a platform >= 34 and build-tools, for the
#                     AAR's Gradle build (JDK 17 on PATH).
#   EXECUTORCH_SRC    optional: an ExecuTorch checkout at the pinned tag (with submodules). Default: cloned into WORK.
#   WORK              optional: build directory (default android_demo/build/executorch-aar). About 6 GB.
#   PYTHON            optional: Python 3.10-3.13 with torch + pyyaml (ExecuTorch's build runs codegen with it).
#                     Default: the repository's .venv/bin/python, else python3.
#   JOBS              optional: parallel build jobs (default: CPU count).
# Tools: bash >= 4, git, cmake >= 3.24, ninja or make, java >= 17, unzip, strings (binutils) or the NDK's llvm-strings.
#
# Outputs:
#   android_demo/app/libs/executorch.aar    the runtime; the app's Gradle build uses it instead of Maven's when present.
#     jni/arm64-v8a/libexecutorch.so        ExecuTorch (XNNPACK, optimized + quantized kernels, llama custom ops, LLM
#                                           runner, JNI) + libpocketllm_kernels.a (whole archive)
#     assets/pocketllm_kernels.json         {"format": 1, "executorch_version", "abi", "kernels": [...],
#                                           "pocketllm_revision"}: what the app checks requires_kernels against.
#   $WORK/pocketllm_kernels.json            the same list, for reference.
#
# The ExecuTorch version comes from pyproject.toml (executorch==X.Y.Z): the .pte programs the exporter writes and the
# runtime must match. Exit codes: 0 ok, 2 bad input or missing tool (one message per problem), other: a build step
# failed (its output above).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$SCRIPT_DIR/../.." && pwd)"
ABI=arm64-v8a
ANDROID_PLATFORM=android-26
OP_PATTERN='^pocketllm::[a-z_][a-z0-9_]*\.out$'

die() { echo "error: $*" >&2; exit 2; }
note() { echo "==> $*" >&2; }

# Registered op names are string literals in the objects ("pocketllm::any4_linear.out"): read them from the binary,
# so the list describes what was compiled, not what the sources intend.
list_ops() {
  local lib="$1" strings_bin=""
  [[ -f "$lib" ]] || die "$lib: no such kernel library"
  if command -v strings >/dev/null 2>&1; then
    strings_bin=strings
  elif [[ -n "${ANDROID_NDK:-}" ]] && compgen -G "$ANDROID_NDK/toolchains/llvm/prebuilt/*/bin/llvm-strings" >/dev/null; then
    strings_bin="$(compgen -G "$ANDROID_NDK/toolchains/llvm/prebuilt/*/bin/llvm-strings" | head -n1)"
  else
    die "need \`strings\` (binutils) or \$ANDROID_NDK/toolchains/llvm/prebuilt/*/bin/llvm-strings to read $lib"
  fi
  local ops
  ops="$("$strings_bin" -a "$lib" | grep -E "$OP_PATTERN" | LC_ALL=C sort -u || true)"
  [[ -n "$ops" ]] || die "$lib registers no pocketllm::*.out operators (is it libpocketllm_kernels?)"
  echo "$ops"
}

pinned_version() {
  local v
  v="$(grep -Eo '"executorch==[0-9]+\.[0-9]+\.[0-9]+"' "$REPO/pyproject.toml" | head -n1 | grep -Eo '[0-9]+\.[0-9]+\.[0-9]+' || true)"
  [[ -n "$v" ]] || die "$REPO/pyproject.toml: no \"executorch==X.Y.Z\" pin found"
  echo "$v"
}

kernels_json() {
  local lib="$1" out="$2" ops version revision
  ops="$(list_ops "$lib")"
  version="$(pinned_version)"
  revision="$(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown)"
  mkdir -p "$(dirname "$out")"
  {
    printf '{\n  "format": 1,\n  "executorch_version": "%s",\n  "abi": "%s",\n  "pocketllm_revision": "%s",\n' \
      "$version" "$ABI" "$revision"
    printf '  "kernels": ['
    local first=1 op
    while IFS= read -r op; do
      if (( first )); then first=0; else printf ', '; fi
      printf '"%s"' "$op"
    done <<< "$ops"
    printf ']\n}\n'
  } > "$out.tmp"
  mv "$out.tmp" "$out"
}

version_ge() {  # version_ge 3.28.1 3.24 -> true when $1 >= $2
  [[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" == "$2" ]]
}

# Every input problem is reported before anything is built.
preflight() {
  local problems=()
  (( BASH_VERSINFO[0] >= 4 )) || problems+=("bash >= 4 needed (this is $BASH_VERSION)")

  if [[ -z "${ANDROID_NDK:-}" ]]; then
    problems+=("ANDROID_NDK is not set: point it at an Android NDK (r27 or newer; ExecuTorch CI uses r28c), e.g. \$ANDROID_HOME/ndk/28.2.13676358")
  elif [[ ! -f "$ANDROID_NDK/build/cmake/android.toolchain.cmake" ]]; then
    problems+=("ANDROID_NDK=$ANDROID_NDK has no build/cmake/android.toolchain.cmake (not an NDK root)")
  else
    local rev
    rev="$(sed -n 's/^Pkg.Revision *= *//p' "$ANDROID_NDK/source.properties" 2>/dev/null || true)"
    if [[ -z "$rev" ]]; then
      problems+=("ANDROID_NDK=$ANDROID_NDK: cannot read Pkg.Revision from source.properties")
    elif (( ${rev%%.*} < 27 )); then
      problems+=("ANDROID_NDK is r${rev%%.*} ($rev): ExecuTorch $(pinned_version) needs r27 or newer (CI: r28c)")
    fi
  fi

  local sdk="${ANDROID_HOME:-${ANDROID_SDK_ROOT:-}}"
  if [[ -z "$sdk" ]]; then
    problems+=("ANDROID_HOME is not set: point it at an Android SDK (the AAR is packaged with Gradle)")
  elif [[ ! -d "$sdk/platforms" ]]; then
    problems+=("ANDROID_HOME=$sdk has no platforms/ directory (install one with sdkmanager \"platforms;android-34\")")
  fi

  command -v git >/dev/null || [[ -n "${EXECUTORCH_SRC:-}" ]] || problems+=("git not found (needed to clone ExecuTorch; or set EXECUTORCH_SRC)")
  if ! command -v cmake >/dev/null; then
    problems+=("cmake not found (3.24 or newer)")
  else
    local cv
    cv="$(cmake --version | head -n1 | grep -Eo '[0-9]+\.[0-9]+(\.[0-9]+)?' || true)"
    version_ge "${cv:-0}" 3.24 || problems+=("cmake $cv is too old: 3.24 or newer needed (WHOLE_ARCHIVE linking)")
  fi
  command -v ninja >/dev/null || command -v make >/dev/null || problems+=("neither ninja nor make found")
  command -v unzip >/dev/null || problems+=("unzip not found (ExecuTorch's JNI build unpacks fbjni with it)")
  if ! command -v java >/dev/null; then
    problems+=("java not found: JDK 17 or newer needed for the AAR's Gradle build")
  else
    local jv
    jv="$(java -version 2>&1 | head -n1 | grep -Eo '"[0-9]+' | tr -d '"' || true)"
    [[ -n "$jv" ]] && (( jv >= 17 )) || problems+=("java ${jv:-?} found: JDK 17 or newer needed")
  fi

  PYTHON="${PYTHON:-}"
  if [[ -z "$PYTHON" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON="$(command -v python3 || true)"; fi
  fi
  if [[ -z "$PYTHON" ]] || ! "$PYTHON" -c 'import sys' 2>/dev/null; then
    problems+=("no Python found: set PYTHON to a Python 3.10-3.13 with torch and pyyaml (the repo's .venv works)")
  else
    local pv
    pv="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    if ! version_ge "$pv" 3.10 || version_ge "$pv" 3.14; then
      problems+=("PYTHON=$PYTHON is Python $pv: ExecuTorch's build needs 3.10-3.13")
    fi
    "$PYTHON" -c 'import yaml, torchgen' 2>/dev/null || problems+=("PYTHON=$PYTHON lacks pyyaml or torch (torchgen): ExecuTorch's kernel codegen imports both; use the repo's .venv")
  fi

  if [[ -n "${EXECUTORCH_SRC:-}" ]]; then
    if [[ ! -f "$EXECUTORCH_SRC/extension/android/CMakeLists.txt" ]]; then
      problems+=("EXECUTORCH_SRC=$EXECUTORCH_SRC is not an ExecuTorch checkout")
    elif [[ "$(basename "$EXECUTORCH_SRC")" != executorch ]]; then
      problems+=("EXECUTORCH_SRC must be a directory named 'executorch' (headers are included as <executorch/...>)")
    else
      local have
      have="$(git -C "$EXECUTORCH_SRC" describe --tags --exact-match 2>/dev/null || true)"
      [[ "$have" == "v$VERSION" ]] || problems+=("EXECUTORCH_SRC is at '${have:-an untagged commit}', not v$VERSION (the pip wheel that wrote the .pte)")
    fi
  fi
  [[ -f "$REPO/kernels/CMakeLists.txt" ]] || problems+=("$REPO/kernels/CMakeLists.txt not found")

  if (( ${#problems[@]} )); then
    printf 'error: %s\n' "${problems[@]}" >&2
    echo "($0 builds nothing until these are fixed; see the header of this script for every input)" >&2
    exit 2
  fi
}

main() {
  VERSION="$(pinned_version)"
  preflight
  [[ "${1:-}" == "--check" ]] && { note "inputs look right (ExecuTorch v$VERSION, NDK $ANDROID_NDK)"; return 0; }

  local sdk="${ANDROID_HOME:-${ANDROID_SDK_ROOT:-}}"
  local work="${WORK:-$REPO/android_demo/build/executorch-aar}"
  local jobs="${JOBS:-$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 4)}"
  local toolchain="$ANDROID_NDK/build/cmake/android.toolchain.cmake"
  mkdir -p "$work"
  work="$(cd "$work" && pwd)"

  # 1. ExecuTorch source at the pinned tag
  local et="${EXECUTORCH_SRC:-$work/src/executorch}"
  if [[ -z "${EXECUTORCH_SRC:-}" && ! -d "$et/.git" ]]; then
    note "cloning ExecuTorch v$VERSION into $et"
    mkdir -p "$(dirname "$et")"
    git clone --depth 1 --branch "v$VERSION" --recurse-submodules --shallow-submodules \
      https://github.com/pytorch/executorch.git "$et"
  fi
  local have
  have="$(git -C "$et" describe --tags --exact-match 2>/dev/null || true)"
  [[ "$have" == "v$VERSION" ]] || die "$et is at '${have:-an untagged commit}', not v$VERSION; remove it or set EXECUTORCH_SRC"

  # 2. pocketllm kernels: static, arm64, against this ExecuTorch's headers (kernels/README.md)
  note "building pocketllm kernels for $ABI"
  cmake -S "$REPO/kernels" -B "$work/kernels-$ABI" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_TOOLCHAIN_FILE="$toolchain" -DANDROID_ABI="$ABI" -DANDROID_PLATFORM="$ANDROID_PLATFORM" \
    -DPOCKETLLM_KERNELS_STATIC=ON -DPOCKETLLM_NATIVE=OFF \
    "-DEXECUTORCH_INCLUDE_DIRS=$(dirname "$et");$et/runtime/core/portable_type/c10"
  cmake --build "$work/kernels-$ABI" -j "$jobs"
  local klib="$work/kernels-$ABI/libpocketllm_kernels.a"
  [[ -f "$klib" ]] || die "kernel build produced no $klib"
  local ops
  ops="$(list_ops "$klib")"
  note "kernels: $(echo "$ops" | tr '\n' ' ')"

  # 3. ExecuTorch runtime + JNI for Android, our archive linked whole (EXECUTORCH_JNI_CUSTOM_LIBRARY in
  #    extension/android/CMakeLists.txt); the same options as ExecuTorch's scripts/build_android_library.sh.
  local out="$work/cmake-out-android-$ABI"
  note "building ExecuTorch v$VERSION for $ABI (this takes a while)"
  (cd "$et" && cmake . -DCMAKE_INSTALL_PREFIX="$out" -B "$out" --preset "android-$ABI" \
    -DCMAKE_TOOLCHAIN_FILE="$toolchain" -DANDROID_PLATFORM="$ANDROID_PLATFORM" -DPYTHON_EXECUTABLE="$PYTHON" \
    -DCMAKE_BUILD_TYPE=Release -DEXECUTORCH_ENABLE_EVENT_TRACER=OFF -DEXECUTORCH_ANDROID_PROFILING=OFF \
    -DEXECUTORCH_BUILD_EXTENSION_LLM=ON -DEXECUTORCH_BUILD_EXTENSION_LLM_RUNNER=ON \
    -DEXECUTORCH_BUILD_EXTENSION_ASR_RUNNER=ON -DEXECUTORCH_BUILD_EXTENSION_TRAINING=ON \
    -DEXECUTORCH_BUILD_LLAMA_JNI=ON -DEXECUTORCH_BUILD_QNN=OFF -DEXECUTORCH_BUILD_NEURON=OFF \
    -DEXECUTORCH_BUILD_VULKAN=OFF -DFLATCC_ALLOW_WERROR=OFF -DSUPPORT_REGEX_LOOKAHEAD=ON \
    -DEXECUTORCH_JNI_CUSTOM_LIBRARY="$klib")
  cmake --build "$out" -j "$jobs" --target install --config Release
  local so
  so="$(find "$out/extension/android" -maxdepth 1 -name '*.so' | head -n1)"
  [[ -n "$so" ]] || die "no JNI library under $out/extension/android"

  # The static registrations must have survived the link (whole-archive; --gc-sections keeps .init_array).
  local linked missing=()
  linked="$(list_ops "$so")"
  while IFS= read -r op; do
    grep -qxF "$op" <<< "$linked" || missing+=("$op")
  done <<< "$ops"
  (( ${#missing[@]} == 0 )) || die "$so lacks ${missing[*]}: the kernels were not linked whole-archive"

  local stage="$et/cmake-out-android-so/$ABI"  # where extension/android's Gradle build takes jniLibs from
  rm -rf "$et/cmake-out-android-so"
  mkdir -p "$stage"
  cp "$so" "$stage/libexecutorch.so"
  "$(compgen -G "$ANDROID_NDK/toolchains/llvm/prebuilt/*/bin/llvm-strip" | head -n1)" "$stage/libexecutorch.so"

  # 4. The AAR (Java/Kotlin API + JNI library), then the kernel list as an asset the app reads.
  note "packaging the AAR with Gradle"
  (cd "$et/extension/android" && ANDROID_HOME="$sdk" ./gradlew --no-daemon :executorch_android:assembleRelease \
    -DexecuTorchVersion="$VERSION")
  local aar="$et/extension/android/executorch_android/build/outputs/aar/executorch_android-release.aar"
  [[ -f "$aar" ]] || die "Gradle produced no $aar"

  kernels_json "$klib" "$work/pocketllm_kernels.json"
  local dest="$REPO/android_demo/app/libs/executorch.aar"
  mkdir -p "$(dirname "$dest")"
  cp "$aar" "$dest.tmp"
  "$PYTHON" - "$dest.tmp" "$work/pocketllm_kernels.json" <<'EOF'
import sys, zipfile
aar, listing = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(aar, "a") as z:
    if "assets/pocketllm_kernels.json" in z.namelist():
        sys.exit(f"{aar} already holds assets/pocketllm_kernels.json")
    z.write(listing, "assets/pocketllm_kernels.json")
EOF
  mv "$dest.tmp" "$dest"
  note "wrote $dest ($(du -h "$dest" | cut -f1)): ExecuTorch v$VERSION $ABI + $(echo "$ops" | wc -l) pocketllm kernels"
  note "next: cd android_demo && ./gradlew :app:installRelease   (the build picks app/libs/executorch.aar)"
}

case "${1:-}" in
  --list-ops) [[ $# -eq 2 ]] || die "usage: $0 --list-ops LIB"; list_ops "$2" ;;
  --kernels-json) [[ $# -eq 3 ]] || die "usage: $0 --kernels-json LIB OUT"; kernels_json "$2" "$3" ;;
  --check|"") main "${1:-}" ;;
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' ;;
  *) die "unknown option $1 (try --help)" ;;
esac
