#!/usr/bin/env bash
# Builds pocketllm's ExecuTorch kernels (kernels/: any4 linear, InfLLM v2 attention, lightning attention) for iOS and
# wires them into the PocketLLM app, so that it runs bundles whose manifest lists them in
# targets.executorch.requires_kernels.
#
# Why this is enough: the ExecuTorch runtime the app uses comes from ExecuTorch's Swift package (prebuilt xcframeworks
# of static libraries, branch swiftpm-1.5.1, pinned in PocketLLMKit/Package.swift). A static kernel library compiled
# against the headers of the same ExecuTorch version links into the same app; its kernels register themselves from
# static initialisers, which the linker keeps only with -force_load (nothing references them by name).
#
# Inputs
#   --executorch-src DIR    ExecuTorch source checkout at tag v1.5.1 (headers only; no build of it).
#                           Default: a shallow clone of v1.5.1 into ios_demo/build/executorch-src (needs git, network).
#   --deployment-target V   iOS deployment target of the kernels (default 17.0, ExecuTorch's own).
#   --allow-version-mismatch  build against a checkout whose version.txt is not 1.5.1 (not recommended: the
#                           kernels must match the runtime's headers).
# Outputs (ios_demo/build/kernels/)
#   iphoneos/libpocketllm_kernels.a, iphonesimulator/libpocketllm_kernels.a   arm64 static libraries
#   linked_kernels.txt      the operator names registered by the library (read from the built archive)
#   Kernels.xcconfig        included by ios_demo/Config/App.xcconfig when present: -force_load of the library for
#                           the SDK being built, and POCKETLLM_LINKED_KERNELS, which Info.plist carries as
#                           PocketLLMLinkedKernels so the app knows which requires_kernels it can satisfy.
# Then: cd ios_demo && xcodegen generate && open PocketLLM.xcodeproj (see ios_demo/README.md).
#
# Requirements: macOS with Xcode (xcrun, iphoneos and iphonesimulator SDKs), CMake >= 3.24.
set -euo pipefail

ET_VERSION="1.5.1"
DEPLOYMENT_TARGET="17.0"
ET_SRC=""
ALLOW_MISMATCH=0

die() {
  echo "error: $*" >&2
  exit 2
}

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e 's/^# \{0,1\}//' -e '/^set -euo/d'
  exit 0
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --executorch-src) [[ $# -ge 2 ]] || die "--executorch-src needs a directory"; ET_SRC="$2"; shift 2 ;;
    --executorch-src=*) ET_SRC="${1#*=}"; shift ;;
    --deployment-target) [[ $# -ge 2 ]] || die "--deployment-target needs a version"; DEPLOYMENT_TARGET="$2"; shift 2 ;;
    --deployment-target=*) DEPLOYMENT_TARGET="${1#*=}"; shift ;;
    --allow-version-mismatch) ALLOW_MISMATCH=1; shift ;;
    -h|--help) usage ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
IOS_DEMO="$(cd "$SCRIPT_DIR/.." && pwd)"
REPO="$(cd "$IOS_DEMO/.." && pwd)"
KERNELS="$REPO/kernels"
OUT="$IOS_DEMO/build/kernels"

# ---- fail early: platform, tools, sources -------------------------------------------------------------------------
[[ "$(uname -s)" == "Darwin" ]] || die "this script builds iOS libraries and needs macOS with Xcode (this is $(uname -s))"
command -v xcrun >/dev/null || die "xcrun not found: install Xcode and run 'xcode-select --install'"
for sdk in iphoneos iphonesimulator; do
  xcrun --sdk "$sdk" --show-sdk-path >/dev/null 2>&1 \
    || die "the $sdk SDK is missing: install Xcode (not only the Command Line Tools) and 'sudo xcode-select -s /Applications/Xcode.app'"
done
command -v cmake >/dev/null || die "cmake not found (brew install cmake; 3.24 or newer)"
CMAKE_VERSION="$(cmake --version | head -n1 | awk '{print $3}')"
if [[ "$(printf '%s\n' 3.24 "$CMAKE_VERSION" | sort -V | head -n1)" != "3.24" ]]; then
  die "cmake $CMAKE_VERSION is too old: kernels/CMakeLists.txt needs 3.24 or newer"
fi
[[ -f "$KERNELS/CMakeLists.txt" ]] || die "$KERNELS/CMakeLists.txt not found: run this script from a pocketllm checkout"
grep -q "branch: \"swiftpm-$ET_VERSION\"" "$IOS_DEMO/PocketLLMKit/Package.swift" \
  || die "PocketLLMKit/Package.swift does not pin ExecuTorch swiftpm-$ET_VERSION: the kernels and the runtime must be the same version"

if [[ -z "$ET_SRC" ]]; then
  ET_SRC="$IOS_DEMO/build/executorch-src"
  if [[ ! -d "$ET_SRC/.git" ]]; then
    command -v git >/dev/null || die "git not found; pass --executorch-src with an ExecuTorch v$ET_VERSION checkout"
    echo "cloning ExecuTorch v$ET_VERSION (headers) into $ET_SRC"
    git clone --depth 1 --branch "v$ET_VERSION" https://github.com/pytorch/executorch.git "$ET_SRC" \
      || die "could not clone ExecuTorch v$ET_VERSION; pass --executorch-src with a checkout"
  fi
fi
ET_SRC="$(cd "$ET_SRC" && pwd)" || die "--executorch-src $ET_SRC is not a directory"
[[ -f "$ET_SRC/runtime/kernel/operator_registry.h" ]] \
  || die "$ET_SRC is not an ExecuTorch checkout (runtime/kernel/operator_registry.h missing)"
[[ -d "$ET_SRC/runtime/core/portable_type/c10/c10" ]] \
  || die "$ET_SRC lacks runtime/core/portable_type/c10/c10 (the c10 headers the kernels include)"
FOUND_VERSION="$(tr -d '[:space:]' < "$ET_SRC/version.txt" 2>/dev/null || echo unknown)"
if [[ "$FOUND_VERSION" != "$ET_VERSION" ]]; then
  [[ "$ALLOW_MISMATCH" == 1 ]] || die "$ET_SRC/version.txt says $FOUND_VERSION, expected $ET_VERSION (the runtime in the app); check out v$ET_VERSION or pass --allow-version-mismatch"
  echo "warning: building against ExecuTorch $FOUND_VERSION headers for a $ET_VERSION runtime" >&2
fi

# The kernels include <executorch/...>: give them an include root whose executorch/ is the checkout, whatever the
# checkout's directory is called.
INCLUDE_ROOT="$IOS_DEMO/build/executorch-include"
mkdir -p "$INCLUDE_ROOT"
ln -sfn "$ET_SRC" "$INCLUDE_ROOT/executorch"

# ---- build: one static library per SDK ----------------------------------------------------------------------------
rm -rf "$OUT"
mkdir -p "$OUT"
for sdk in iphoneos iphonesimulator; do
  echo "building kernels for $sdk (arm64, iOS $DEPLOYMENT_TARGET)"
  cmake -S "$KERNELS" -B "$IOS_DEMO/build/kernels-$sdk" --fresh \
    -DCMAKE_SYSTEM_NAME=iOS \
    -DCMAKE_OSX_SYSROOT="$sdk" \
    -DCMAKE_OSX_ARCHITECTURES=arm64 \
    -DCMAKE_OSX_DEPLOYMENT_TARGET="$DEPLOYMENT_TARGET" \
    -DCMAKE_TRY_COMPILE_TARGET_TYPE=STATIC_LIBRARY \
    -DCMAKE_BUILD_TYPE=Release \
    -DPOCKETLLM_KERNELS_STATIC=ON \
    -DPOCKETLLM_NATIVE=OFF \
    "-DEXECUTORCH_INCLUDE_DIRS=$INCLUDE_ROOT;$ET_SRC/runtime/core/portable_type/c10" >/dev/null \
    || die "cmake configure failed for $sdk (rerun without >/dev/null in this script to see why)"
  cmake --build "$IOS_DEMO/build/kernels-$sdk" --config Release -j "$(sysctl -n hw.ncpu)" \
    || die "building the kernels for $sdk failed"
  LIB="$(find "$IOS_DEMO/build/kernels-$sdk" -name libpocketllm_kernels.a -print -quit)"
  [[ -n "$LIB" ]] || die "libpocketllm_kernels.a was not produced for $sdk"
  mkdir -p "$OUT/$sdk"
  cp "$LIB" "$OUT/$sdk/libpocketllm_kernels.a"
  xcrun lipo -info "$OUT/$sdk/libpocketllm_kernels.a" | grep -q arm64 || die "$OUT/$sdk/libpocketllm_kernels.a is not arm64"
done

# ---- record what was linked ---------------------------------------------------------------------------------------
# The registered names are string literals in the objects ("pocketllm::<op>.out"): read them from the archive, and
# check them against the registrations in the sources.
strings -a "$OUT/iphoneos/libpocketllm_kernels.a" | grep -E '^pocketllm::[A-Za-z0-9_]+\.out$' | sort -u > "$OUT/linked_kernels.txt"
{
  sed -nE 's/.*EXECUTORCH_LIBRARY\(([A-Za-z0-9_]+), *"([A-Za-z0-9_.]+)".*/\1::\2/p' "$KERNELS"/*.cpp
  sed -nE 's/.*Kernel\("(pocketllm::[A-Za-z0-9_.]+)".*/\1/p' "$KERNELS"/*.cpp
} | sort -u > "$OUT/registered_in_sources.txt"
[[ -s "$OUT/linked_kernels.txt" ]] || die "no pocketllm::*.out registration found in the built library"
diff -u "$OUT/registered_in_sources.txt" "$OUT/linked_kernels.txt" >&2 \
  || die "the library's registrations differ from the sources' (see the diff above)"

LINKED="$(tr '\n' ' ' < "$OUT/linked_kernels.txt" | sed 's/ *$//')"
cat > "$OUT/Kernels.xcconfig" <<EOF
// Written by ios_demo/scripts/build_executorch_frameworks.sh ($(date -u +%Y-%m-%dT%H:%M:%SZ), ExecuTorch $FOUND_VERSION headers).
POCKETLLM_KERNELS_DIR = $OUT
POCKETLLM_KERNELS_LDFLAGS = -force_load \$(POCKETLLM_KERNELS_DIR)/\$(PLATFORM_NAME)/libpocketllm_kernels.a
POCKETLLM_LINKED_KERNELS = $LINKED
EOF

echo "linked kernels: $LINKED"
echo "wrote $OUT/Kernels.xcconfig; now: cd ios_demo && xcodegen generate, then build the PocketLLM scheme"
