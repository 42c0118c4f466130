"""pocketllm bundles against llama.cpp on the same weights: speed (decode, prefill, 16K context), file size, peak RSS.

    .venv/bin/python benchmarks/vs_llamacpp.py --checkpoint out/vsl/m05 \
        --bundle any4=out/vsl/any4 --bundle 8da4w=out/vsl/8da4w \
        --out benchmarks/results/vs_llamacpp

Steps (each reuses what an earlier run left in --cache / --work; cache_plan decides what the cache still needs):
1. llama.cpp: PyPI's llama-cpp-python sdist (pip download --no-binary --no-deps) into --cache (default
   ~/.cache/pocketllm/llamacpp, outside the repo), its vendored llama.cpp configured with cmake
   -DGGML_NATIVE=ON -DLLAMA_CURL=OFF (shared libs; no tests, examples or server) and only the targets needed built:
   libllama, llama-quantize, llama-bench (nice -n 19, --jobs).
2. Two small C++ drivers with one line protocol (benchmarks/llamacpp_runner.cpp against llama.h,
   benchmarks/et_runner.cpp against the executorch wheel's headers and libraries) -> --work/bin.
3. The checkpoint converted with llama.cpp's convert_hf_to_gguf.py to f32, then llama-quantize Q4_0 (default: tied
   embedding/head Q6_K) and Q4_0 with an f32 head (--output-tensor-type f32 --token-embedding-type f32).
   Exactness: llama.cpp f32 logits (f32 KV cache) vs pocketllm's numpy reference on the same checkpoint, a few
   tokens, max |diff| <= 1e-3. The C++ ExecuTorch runner's logits vs the numpy reference on each bundle's own
   reference weights are recorded too (exact variants <= 1e-3).
4. One sitting, every engine a long-lived process holding its model and a cache as long as the bundles' (so both
   sides allocate the same KV capacity), commands alternated round-robin (the variant order rotates every round):
   - prefill: --prefill-tokens random tokens at positions 0.. in one call (llama.cpp: one llama_decode batch;
     ExecuTorch: forward calls of at most the bundle's prefill_chunk tokens). Logits for the same positions on both
     sides: a pocketllm .pte returns logits for every position of a call (manifest output [1, T, vocab]), so
     llama.cpp's batch sets logits=1 for every token ("prefill_all"); llama.cpp with logits for the last position
     only (what llama-bench times) is recorded beside it ("prefill_last").
   - decode from an empty cache: --decode-steps single-token calls at positions 0, 1, ... (llama-bench's tg).
   - at --long-context (16K), for --long-variants (default llama.cpp Q4_0 and every bundle): each engine prefills
     that many tokens (one after the other, not alternated; llama.cpp computes the last position's logits, a .pte
     every position's), then decode rounds alternate as above at the same positions long_context + i on both
     sides. Every MiniCPM4 bundle runs InfLLM v2 there (sparse beyond dense_len); llama.cpp runs dense attention.
   Reported: the median call (prefill: tokens / median seconds; decode: 1000 / median ms), 1 and 2 threads.
   llama-bench (Q4_0, -p/-n, the same threads) runs once after the rounds as a cross-check of the driver.
5. Peak RSS of a --rss-tokens greedy generation (16-token prompt) from C++, one process per run under
   /usr/bin/time -v: llama.cpp (mmap, the bundles' context length) and each bundle with ExecuTorch Module loading
   the .pte with mmap and with mmap+mlock, llama::update_cache either from the wheel's custom-ops library (which
   links libtorch and needs libpython) or built into the driver (the footprint of an app without libtorch).
6. JSON (--out STEM.json) with top-level best_decode_ratio_vs_q4_0 and any4_exact_decode_ratio_vs_q4_0 (2 threads,
   empty cache), prefill and 16K ratios, file sizes, peak RSS, machine load (load averages, CPU used by other
   processes during the sitting), versions and commands; a plot (STEM.png).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
DEFAULT_CACHE = Path(os.environ.get("POCKETLLM_LLAMACPP_CACHE", "~/.cache/pocketllm/llamacpp")).expanduser()
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_TOOLS=ON"]
BUILD_TARGETS = ["llama", "llama-quantize", "llama-bench"]
Q4_0 = "llama.cpp Q4_0"
Q4_0_F32HEAD = "llama.cpp Q4_0 f32 head"
REFERENCE_THREADS = 2
EXACT_TOLERANCE = 1e-3
ENV = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_NUM_THREADS": "1"}
# llama.cpp (built with OpenMP) runs with its own default wait policy, as its users run it: with PASSIVE its threads
# sleep between graph launches and 2-thread decode of the 0.5b halves (llama-bench -t 1,2 -n 32 on the quiet 2-core
# machine, 2026-12-01: PASSIVE 51-76 / 36.5-36.9 tok/s, default 69-72 / 81-83 tok/s). The ExecuTorch drivers do
# not use OpenMP (pthreadpool and the kernels' own helpers), so the policy does not touch them.
LLAMA_ENV_DROP = ("OMP_WAIT_POLICY",)


def engine_env(cmd: list) -> dict:
    """The environment of a child: ENV, except that a llama.cpp binary keeps its OpenMP defaults."""
    env = {**os.environ, **ENV}
    if any(Path(str(c)).name.startswith(("llama", "llamacpp")) for c in cmd[:4]):
        for k in LLAMA_ENV_DROP:
            env.pop(k, None)
    return env


# ------------------------------------------------------------------------------------------------ pure parts

def parse_bundles(specs: list[str]) -> dict[str, Path]:
    """["name=DIR", ...] -> {name: Path}; names unique and distinct from the llama.cpp variants."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise ValueError(f"--bundle {spec!r}: expected NAME=DIR")
        if name in out or name.startswith("llama.cpp"):
            raise ValueError(f"--bundle {spec!r}: the name {name!r} is taken")
        out[name] = Path(path)
    return out


def parse_long_variants(text: str, bundles: list[str]) -> list[str]:
    """--long-variants: 'all' = llama.cpp Q4_0 and every bundle; else names among those (Q4_0 always included:
    the ratios are against it)."""
    known = [Q4_0, Q4_0_F32HEAD, *bundles]
    if text.strip() == "all":
        return [Q4_0, *bundles]
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--long-variants: unknown {unknown}; known: {known}")
    return [Q4_0, *[n for n in names if n != Q4_0]]


def parse_ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise ValueError(f"expected positive integers separated by commas, got {text!r}")
    return values


def rotate(items: list, k: int) -> list:
    """Round k's order: the list rotated by k, so that no variant always runs first (or right after another)."""
    if not items:
        return []
    k %= len(items)
    return items[k:] + items[:k]


def long_decode_positions(long_context: int, steps: int, rounds: int, threads: list[int], capacity: int) -> list:
    """Start positions of the decode bursts after the long prefill: [(round, threads, start)], the same on every
    engine; each burst continues where the previous one stopped (a real conversation's next tokens)."""
    out, pos = [], long_context
    for r in range(rounds):
        for t in threads:
            out.append((r, t, pos))
            pos += steps
    if pos > capacity:
        raise ValueError(f"long-context decode needs positions up to {pos} but the cache holds {capacity}: "
                         f"lower --decode-steps/--rounds or export the bundles with a larger --max-context")
    return out


def summarize_prefill(seconds: list[float], tokens: int) -> dict:
    med = statistics.median(seconds)
    return {"tokens": tokens, "calls": len(seconds), "s_median": med, "tok_s": tokens / med,
            "s_all": seconds}


def summarize_decode(ms: list[float]) -> dict:
    med = statistics.median(ms)
    return {"steps": len(ms), "ms_median": med, "tok_s": 1000.0 / med, "tok_s_mean": 1000.0 * len(ms) / sum(ms),
            "ms_min": min(ms), "ms_max": max(ms)}


def parse_time_v(text: str) -> dict:
    """The fields of GNU time -v this script reads (peak RSS in MiB, wall seconds, page faults)."""
    out: dict = {}
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if m:
        out["max_rss_mib"] = int(m.group(1)) / 1024
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    if m:
        secs = 0.0
        for part in m.group(1).split(":"):
            secs = secs * 60 + float(part)
        out["wall_s"] = secs
    for key, label in (("major_faults", "Major (requiring I/O) page faults"),
                       ("minor_faults", "Minor (reclaiming a frame) page faults"),
                       ("exit_status", "Exit status")):
        m = re.search(re.escape(label) + r": (\d+)", text)
        if m:
            out[key] = int(m.group(1))
    return out


def classify_bundle(manifest: dict) -> dict:
    """What a bundle's weights are, from its manifest: scheme, activations, head, whether it is 'exact any4'
    (fp32 activations: the numpy reference reproduces it to 1e-3)."""
    q = manifest.get("quantization") or {}
    scheme = str(q.get("scheme") or q.get("method") or q.get("quant") or "none").lower()
    variant = str(q.get("variant") or scheme).lower()
    w4a8 = "w4a8" in scheme or "w4a8" in variant
    activations = str(q.get("activations") or q.get("activation_dtype") or
                      ("int8" if scheme in ("8da4w",) or w4a8 else "fp32")).lower()
    head = q.get("lm_head") or q.get("head")
    exact_any4 = scheme.startswith("any4") and not w4a8 and activations in ("fp32", "float32", "none")
    head_quantized = head is not None and str(head).lower() not in ("fp32", "float32", "bf16", "fp16", "none")
    return {"scheme": scheme, "variant": variant, "activations": activations, "lm_head": head,
            "head_quantized": head_quantized, "exact_any4": exact_any4}


def klass_exact(quantization: dict) -> bool:
    """Variants held to |delta| <= 1e-3 at every position: fp32 activations over any4/int4/nf4/int8/no weights."""
    q = quantization or {}
    return q.get("scheme", "none") in ("none", "any4", "int4", "nf4", "int8") and q.get("activations", "fp32") == "fp32"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def compute_ratios(variants: dict, reference: str = Q4_0, threads: int = REFERENCE_THREADS) -> dict:
    """Ratios of every pocketllm variant to llama.cpp `reference` (tok/s over tok/s, same sitting). variants:
    {name: {"engine", "decode": {t: {"tok_s"}}, "prefill": {t: {"tok_s"}}, "prefill_matched": {t: {...}},
    "long": {"decode": {t: {...}}}, "class": {...}}}. Returns the top-level keys of the result."""
    ref = variants.get(reference) or {}

    def tok_s(v, *path):
        for p in path:
            v = (v or {}).get(p) if isinstance(v, dict) else None
        return v

    out: dict = {"reference": reference, "reference_threads": threads,
                 "decode": {}, "prefill": {}, "long_decode": {}, "long_prefill": {}}
    for name, v in variants.items():
        if v.get("engine") != "executorch":
            continue
        for t in sorted(set(v.get("decode", {})) | set(ref.get("decode", {})), key=int):
            out["decode"].setdefault(str(t), {})[name] = ratio(tok_s(v, "decode", t, "tok_s"),
                                                               tok_s(ref, "decode", t, "tok_s"))
            # prefill: compared with llama.cpp computing logits for the same positions as the bundle does
            key = "prefill_all" if v.get("prefill_logits", "all") == "all" else "prefill_last"
            out["prefill"].setdefault(str(t), {})[name] = ratio(tok_s(v, "prefill", t, "tok_s"),
                                                                tok_s(ref, key, t, "tok_s"))
        for t in sorted(set(tok_s(v, "long", "decode") or {}), key=int):
            out["long_decode"].setdefault(str(t), {})[name] = ratio(tok_s(v, "long", "decode", t, "tok_s"),
                                                                    tok_s(ref, "long", "decode", t, "tok_s"))
        for t in sorted(set(tok_s(v, "long", "prefill") or {}), key=int):
            out["long_prefill"].setdefault(str(t), {})[name] = ratio(tok_s(v, "long", "prefill", t, "tok_s"),
                                                                     tok_s(ref, "long", "prefill", t, "tok_s"))

    def best(table: dict, only=None) -> tuple:
        row = {k: r for k, r in (table.get(str(threads)) or {}).items() if r is not None and (only is None or only(k))}
        if not row:
            return None, None
        name = max(row, key=row.get)
        return row[name], name

    # exact any4 (fp32 activations): the bar is for an 8-bit (quantized) head; a float-head bundle counts
    # only when no exact bundle with a quantized head was measured
    klass = {n: variants[n].get("class") or {} for n in variants}
    exact_quantized_head = {n for n, c in klass.items() if c.get("exact_any4") and c.get("head_quantized")}
    exact_any = {n for n, c in klass.items() if c.get("exact_any4")}
    exact_pool = exact_quantized_head or exact_any
    exact = lambda n: n in exact_pool  # noqa: E731
    top = {}
    top["best_decode_ratio_vs_q4_0"], top["best_decode_variant"] = best(out["decode"])
    top["any4_exact_decode_ratio_vs_q4_0"], top["any4_exact_variant"] = best(out["decode"], exact)
    top["best_prefill_ratio_vs_q4_0"], top["best_prefill_variant"] = best(out["prefill"])
    top["best_long_decode_ratio_vs_q4_0"], top["best_long_decode_variant"] = best(out["long_decode"])
    top["ratios"] = out
    return top


TOP_LEVEL_KEYS = ("best_decode_ratio_vs_q4_0", "best_decode_variant", "any4_exact_decode_ratio_vs_q4_0",
                  "any4_exact_variant", "best_prefill_ratio_vs_q4_0", "best_long_decode_ratio_vs_q4_0", "ratios",
                  "variants", "conversion", "rss", "machine", "versions", "commands", "settings", "method")


def check_result(result: dict) -> list[str]:
    """Problems with a result's shape (empty when fine): the keys README/issue readers rely on."""
    problems = [f"missing key {k}" for k in TOP_LEVEL_KEYS if k not in result]
    for name, v in (result.get("variants") or {}).items():
        for k in ("engine", "file_mib", "decode", "prefill"):
            if k not in v:
                problems.append(f"variant {name}: missing {k}")
    if Q4_0 not in (result.get("variants") or {}):
        problems.append(f"no {Q4_0} variant")
    return problems


# ------------------------------------------------------------------------------------------------ machine

def run(cmd: list, log: Path | None = None, env: dict | None = None, cwd: Path | None = None, check=True):
    print("+", " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    full_env = {**os.environ, **ENV, **(env or {})}
    if log:
        with open(log, "a") as f:
            f.write("+ " + " ".join(shlex.quote(str(c)) for c in cmd) + "\n")
            f.flush()
            p = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=full_env, cwd=cwd)
    else:
        p = subprocess.run([str(c) for c in cmd], env=full_env, cwd=cwd)
    if check and p.returncode:
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(map(str, cmd))}" + (f"; see {log}" if log else ""))
    return p


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return sum(parts[:8]) - idle, sum(parts[:8])


def pid_jiffies(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


class LoadMeter:
    """CPU the rest of the machine used while we measured: (all busy jiffies - ours) / wall, in cores."""

    def __init__(self):
        self.samples: list[dict] = []
        self.hz = os.sysconf("SC_CLK_TCK")

    def start(self, pids: list[int]):
        self.t0, self.busy0 = time.monotonic(), cpu_jiffies()[0]
        self.ours0 = sum(pid_jiffies(p) for p in pids) + self._self()
        self.pids = pids

    def _self(self) -> int:
        t = os.times()
        return int((t.user + t.system) * self.hz)

    def stop(self, label: str) -> dict:
        wall = time.monotonic() - self.t0
        busy = cpu_jiffies()[0] - self.busy0
        ours = sum(pid_jiffies(p) for p in self.pids) + self._self() - self.ours0
        s = {"label": label, "wall_s": round(wall, 2), "loadavg": [round(x, 2) for x in os.getloadavg()],
             "all_busy_cores": round(busy / self.hz / wall, 3) if wall else None,
             "other_busy_cores": round(max(0, busy - ours) / self.hz / wall, 3) if wall else None}
        self.samples.append(s)
        return s


def top_processes(n: int = 8) -> list[str]:
    p = subprocess.run(["ps", "-eo", "pcpu,rss,etime,args", "--sort=-pcpu"], capture_output=True, text=True)
    return [line[:160] for line in p.stdout.splitlines()[1:n + 1]]


# ------------------------------------------------------------------------------------------------ build

def llama_source(cache: Path) -> Path:
    return cache / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}" / "vendor" / "llama.cpp"


def build_stamp() -> str:
    """What a finished build records (flags and targets): a cache built with other flags is rebuilt."""
    return json.dumps({"flags": CMAKE_FLAGS, "targets": BUILD_TARGETS})


def cache_plan(cache: Path) -> dict:
    """Which steps a run must do with this cache: download the sdist, extract it, configure+build. A step is
    skipped when what it makes is there (the build: its stamp matches these flags and targets and the binaries
    exist)."""
    sdist = cache / "sdist" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    src = llama_source(cache)
    build = cache / "build"
    stamp = build / "pocketllm.stamp"
    bins = [build / "bin" / "llama-quantize", build / "bin" / "llama-bench"]
    built = stamp.exists() and stamp.read_text() == build_stamp() and all(b.exists() for b in bins)
    return {"download": not sdist.exists() and not (src / "CMakeLists.txt").exists(),
            "extract": not (src / "CMakeLists.txt").exists(), "build": not built,
            "sdist": sdist, "src": src, "build_dir": build, "stamp": stamp}


def ensure_llamacpp(cache: Path, jobs: int, commands: list) -> dict:
    """Download the sdist once, extract it, configure and build the needed targets (reused when up to date)."""
    cache.mkdir(parents=True, exist_ok=True)
    plan = cache_plan(cache)
    sdist, src, build, stamp = plan["sdist"], plan["src"], plan["build_dir"], plan["stamp"]
    download = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", sdist.parent]
    configure = ["cmake", "-S", src, "-B", build, "-G", "Ninja", *CMAKE_FLAGS]
    make = ["nice", "-n", "19", "cmake", "--build", build, f"-j{jobs}", "--target", *BUILD_TARGETS]
    commands.extend([download, configure, make])
    if plan["download"]:
        run(download)
    if plan["extract"]:
        (cache / "src").mkdir(exist_ok=True)
        with tarfile.open(sdist) as tar:
            tar.extractall(cache / "src", filter="data")
    build_s = None
    if plan["build"]:
        t0 = time.monotonic()
        run(configure, log=cache / "configure.log")
        run(make, log=cache / "build.log")
        build_s = time.monotonic() - t0
        print(f"llama.cpp built in {build_s:.0f} s", flush=True)
        stamp.write_text(build_stamp())
    else:
        print(f"llama.cpp: reusing the build in {build}", flush=True)
    commit = None
    for candidate in (src / ".git",):
        if candidate.exists():
            p = subprocess.run(["git", "-C", src, "rev-parse", "HEAD"], capture_output=True, text=True)
            commit = p.stdout.strip() or None
    if commit is None:  # the sdist records the vendored commit in build-info when git is absent
        m = re.search(r"LLAMA_BUILD_COMMIT[^\"]*\"([0-9a-f]+)\"", (build / "common" / "build-info.cpp").read_text()
                      if (build / "common" / "build-info.cpp").exists() else "")
        commit = m.group(1) if m else None
    return {"source": str(src), "build": str(build), "bin": str(build / "bin"), "commit": commit,
            "reused": not plan["build"], "build_s": build_s,
            "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION, "cmake_flags": CMAKE_FLAGS, "targets": BUILD_TARGETS}


def et_paths() -> dict:
    import executorch  # a namespace package: no __file__

    root = Path(list(executorch.__path__)[0]).resolve()
    return {"root": root, "include": root / "include", "lib": root / "lib",
            "c10": root / "include" / "executorch" / "runtime" / "core" / "portable_type" / "c10",
            "llama_ops": root / "extension" / "llm" / "custom_ops" / "libcustom_ops_aot_lib.so"}


def libpython() -> Path | None:
    import sysconfig

    for d in (sysconfig.get_config_var("LIBDIR"), "/usr/lib/x86_64-linux-gnu"):
        for name in (sysconfig.get_config_var("INSTSONAME"), sysconfig.get_config_var("LDLIBRARY")):
            if d and name and (Path(d) / name).exists():
                return Path(d) / name
    return None


def build_drivers(llama: dict, work: Path, commands: list) -> dict:
    """Compile the two drivers when their source (or the libraries) changed."""
    bindir = work / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    src = Path(llama["source"])
    et = et_paths()
    cxx = ["nice", "-n", "19", "g++", "-O2", "-std=c++17", "-Wno-deprecated-declarations"]
    jobs = {
        "llamacpp_runner": cxx + [REPO / "benchmarks/llamacpp_runner.cpp", "-I", src / "include", "-I",
                                  src / "ggml/include", "-L", llama["bin"], "-lllama", "-lggml", "-lggml-base",
                                  f"-Wl,-rpath,{llama['bin']}"],
        "et_runner": cxx + ["-DC10_USING_CUSTOM_GENERATED_MACROS", "-DET_EVENT_TRACER_ENABLED",
                            REPO / "benchmarks/et_runner.cpp", "-I", et["include"], "-I", et["c10"], "-L", et["lib"],
                            "-Wl,--no-as-needed", "-lexecutorch", "-lexecutorch_kernels_optimized",
                            "-lexecutorch_backend_xnnpack", "-lexecutorch_threadpool", "-Wl,--as-needed", "-ldl",
                            f"-Wl,-rpath,{et['lib']}"],
    }
    out = {}
    for name, cmd in jobs.items():
        exe = bindir / name
        cmd = cmd + ["-o", exe]
        key = hashlib.sha256((" ".join(map(str, cmd)) + (REPO / f"benchmarks/{name}.cpp").read_text()
                              + (REPO / "benchmarks/driver_common.h").read_text()).encode())
        stamp = bindir / f"{name}.sha256"
        commands.append(cmd)
        if not (exe.exists() and stamp.exists() and stamp.read_text() == key.hexdigest()):
            run(cmd, log=work / "drivers.log")
            stamp.write_text(key.hexdigest())
        out[name] = exe
    return out


def converter_env(llama: dict) -> dict:
    return {"PYTHONPATH": str(Path(llama["source"]) / "gguf-py"), "NO_LOCAL_GGUF": ""}


def convert(checkpoint: Path, llama: dict, work: Path, commands: list) -> dict:
    """checkpoint -> f32 GGUF -> Q4_0 (default head) and Q4_0 with an f32 head; reused when present."""
    gg = work / "gguf"
    gg.mkdir(parents=True, exist_ok=True)
    stem = checkpoint.resolve().name
    f32 = gg / f"{stem}-f32.gguf"
    files = {"f32": f32, Q4_0: gg / f"{stem}-q4_0.gguf", Q4_0_F32HEAD: gg / f"{stem}-q4_0-f32head.gguf"}
    conv = [sys.executable, Path(llama["source"]) / "convert_hf_to_gguf.py", checkpoint, "--outtype", "f32",
            "--outfile", f32]
    quant = Path(llama["bin"]) / "llama-quantize"
    q1 = ["nice", "-n", "19", quant, f32, files[Q4_0], "Q4_0", "1"]
    q2 = ["nice", "-n", "19", quant, "--output-tensor-type", "f32", "--token-embedding-type", "f32", f32,
          files[Q4_0_F32HEAD], "Q4_0", "1"]
    commands.extend([conv, q1, q2])
    src_mtime = max(p.stat().st_mtime for p in checkpoint.iterdir())
    if not f32.exists() or f32.stat().st_mtime < src_mtime:
        run(["nice", "-n", "19", *conv], log=work / "convert.log", env=converter_env(llama))
    for key, cmd in ((Q4_0, q1), (Q4_0_F32HEAD, q2)):
        if not files[key].exists() or files[key].stat().st_mtime < f32.stat().st_mtime:
            run(cmd, log=work / "convert.log")
    return files


# ------------------------------------------------------------------------------------------------ engines

class Worker:
    """A driver process (llamacpp_runner or et_runner) answering one JSON line per command."""

    def __init__(self, name: str, cmd: list, log: Path):
        self.name, self.cmd = name, [str(c) for c in cmd]
        self.log = open(log, "a")
        self.log.write("+ " + " ".join(map(shlex.quote, self.cmd)) + "\n")
        self.log.flush()
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, bufsize=1, env=engine_env(self.cmd))
        self.ready = self._read()

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise SystemExit(f"{self.name}: the driver exited ({self.proc.wait()}); see {self.log.name}")
            line = line.strip()
            if line.startswith("{"):
                reply = json.loads(line)
                if "error" in reply:
                    raise SystemExit(f"{self.name}: {reply['error']}; see {self.log.name}")
                return reply

    def __call__(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)
        self.log.close()


def read_bundle(name: str, path: Path) -> dict:
    from pocketllm.export.bundle.manifest import read_manifest

    m = read_manifest(path, verify=False)
    t = m["targets"]["executorch"]
    out_shape = ((t.get("outputs") or [{}])[0].get("shape") or [1, "T"])
    return {"name": name, "bundle": str(path), "manifest": m, "pte": path / t["file"],
            "max_context": int(m["model"]["max_context"]), "chunk": int(t.get("prefill_chunk") or 256),
            "prefill_logits": "all" if out_shape[1] == "T" else "last",
            "requires_kernels": t.get("requires_kernels", []),
            "llama_ops": sorted({op for op in t.get("operators", []) if op.startswith("llama::")})}


def et_command(exe: Path, b: dict, kernels: Path, mode: str = "mmap", llama_ops: str = "builtin") -> list:
    cmd = [exe, b["pte"], "--load", mode, "--chunk", b["chunk"]]
    if b["requires_kernels"]:
        cmd += ["--kernels", kernels]
    if b["llama_ops"]:
        if llama_ops == "builtin" and set(b["llama_ops"]) <= {"llama::update_cache.out"}:
            cmd += ["--builtin-update-cache"]
        else:
            lp = libpython()
            cmd += (["--preload", lp] if lp else []) + ["--kernels", et_paths()["llama_ops"]]
    return cmd


def time_v(cmd: list, log: Path, fatal: bool = True) -> dict:
    p = subprocess.run(["/usr/bin/time", "-v", *map(str, cmd)], capture_output=True, text=True,
                       env=engine_env(cmd))
    with open(log, "a") as f:
        f.write("+ /usr/bin/time -v " + " ".join(map(shlex.quote, map(str, cmd))) + "\n" + p.stdout + p.stderr)
    out = parse_time_v(p.stderr)
    reply = next((json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")), {})
    if p.returncode or "error" in reply:
        if fatal:
            raise SystemExit(f"RSS run failed ({p.returncode}): {' '.join(map(str, cmd))}; see {log}")
        return {**out, "error": (reply.get("error") or p.stderr.strip().splitlines()[-1:] or ["?"])[0][-300:],
                "max_rss_mib": None, "command": " ".join(map(str, cmd))}
    out.update({k: reply.get(k) for k in ("generated", "prefill_s", "decode_s", "vm_hwm_mib")})
    out["tokens_head"] = (reply.get("tokens") or [])[:8]
    out["command"] = " ".join(map(str, cmd))
    return out


def reference_logits(model_dir: Path, tokens: list[int], max_context: int = 256, activations: str = "fp32",
                     kv_cache_dtype: str = "float32"):
    """The numpy reference's logits; activations "int8": a W4A8 bundle's numerics (its parity contract);
    kv_cache_dtype "float16": a bundle whose KV cache is fp16 (the reference rounds what it caches alike)."""
    from pocketllm.runtime_py import ReferenceModel

    ref = ReferenceModel.from_checkpoint(model_dir, max_context=max_context, activations=activations,
                                         kv_cache_dtype=kv_cache_dtype)
    return ref.forward(tokens, 0)


def logits_diff(worker: Worker, tokens: list[int], reference, path: Path) -> dict:
    import numpy as np

    r = worker(f"logits {path} 0 " + " ".join(map(str, tokens)))
    got = np.fromfile(path, dtype=np.float32).reshape(len(tokens), r["vocab"])
    path.unlink()
    d = np.abs(got - reference)
    rows = d.max(-1)
    return {"tokens": tokens, "max_abs_diff": float(d.max()), "max_abs_logit": float(np.abs(reference).max()),
            "per_position_max_abs_diff": [float(x) for x in rows],
            "positions_within_tolerance": float((rows <= EXACT_TOLERANCE).mean()),
            "argmax_agree": int((got.argmax(-1) == reference.argmax(-1)).sum())}


# ------------------------------------------------------------------------------------------------ sitting

def sitting(make_worker, engines: dict, args, meter: LoadMeter) -> dict:
    """One phase per thread count (ExecuTorch's XNNPACK delegates keep the threadpool they were loaded with, so a
    process runs at one thread count): every variant's process started, warmed up, then --rounds rounds over
    them in rotating order; at the long-context thread counts each process then prefills --long-context tokens
    (one after the other) and decode bursts alternate at the same positions. Returns {name: {"prefill",
    "prefill_last" (llama.cpp), "decode", "long", "worker"}} keyed by thread count (str)."""
    names = list(engines)
    P, K, L = args.prefill_tokens, args.decode_steps, args.long_context
    res: dict = {n: {"prefill": {}, "decode": {}, "worker": {}} for n in names}
    for n in names:
        if engines[n] == "llama.cpp":
            res[n].update(prefill_all=res[n]["prefill"], prefill_last={})
    for t in sorted(set(args.threads) | (set(args.long_threads) if L else set())):
        workers = {}
        try:
            for n in names:
                workers[n] = make_worker(n, t)
            pids = [w.proc.pid for w in workers.values()]
            for n in names:  # warm-up: first touch of the weights, threadpools, caches
                workers[n](f"prefill {P} 0 all 99")
                workers[n]("reset")
                workers[n]("decode 4 0 99")
            if t in args.threads:
                raw = {n: {"prefill": [], "prefill_last": [], "decode": []} for n in names}
                meter.start(pids)
                for rnd in range(args.rounds):
                    for n in rotate(names, rnd):
                        w, seed = workers[n], 1000 * rnd + t
                        w("reset")
                        raw[n]["prefill"].append(w(f"prefill {P} 0 all {seed}")["s"])
                        if engines[n] == "llama.cpp":
                            w("reset")
                            raw[n]["prefill_last"].append(w(f"prefill {P} 0 last {seed}")["s"])
                        w("reset")
                        raw[n]["decode"].extend(w(f"decode {K} 0 {seed}")["ms"])
                load = meter.stop(f"{t} threads: {args.rounds} rounds")
                print(f"{t} threads, load {load}", flush=True)
                for n in names:
                    r = res[n]
                    r["prefill"][str(t)] = summarize_prefill(raw[n]["prefill"], P)
                    r["decode"][str(t)] = summarize_decode(raw[n]["decode"])
                    if engines[n] == "llama.cpp":
                        r["prefill_last"][str(t)] = summarize_prefill(raw[n]["prefill_last"], P)
                    print(f"{n:>26} {t}T: prefill {r['prefill'][str(t)]['tok_s']:7.1f} tok/s"
                          + (f" (last-only {r['prefill_last'][str(t)]['tok_s']:7.1f})" if "prefill_last" in r else "")
                          + f"  decode {r['decode'][str(t)]['tok_s']:6.2f} tok/s", flush=True)
            long_names = [n for n in names if n in args.long_variants]
            if L and t in args.long_threads and long_names:
                capacity = min(workers[n].ready.get("capacity", 0) for n in long_names)
                plan = long_decode_positions(L, K, args.long_rounds, [t], capacity)
                for n in long_names:
                    w = workers[n]
                    w("reset")
                    # the long prefill only fills the cache: llama.cpp computes the last position's logits (what
                    # an app does); a .pte computes every position's (its output is [1, T, vocab])
                    which = "last" if engines[n] == "llama.cpp" else "all"
                    meter.start(pids)
                    s = w(f"prefill {L} 0 {which} 7")["s"]
                    load = meter.stop(f"{t} threads: prefill {L} {n}")
                    res[n].setdefault("long", {"context": L, "prefill": {}, "decode": {}})
                    res[n]["long"]["prefill"][str(t)] = {"tokens": L, "s": s, "tok_s": L / s, "logits": which,
                                                         "load": load}
                    print(f"{n:>26} {t}T prefill {L}: {s:.1f} s ({L / s:.1f} tok/s)", flush=True)
                raw_long: dict = {n: [] for n in long_names}
                meter.start(pids)
                for rnd, _, pos in plan:
                    for n in rotate(long_names, rnd):
                        raw_long[n].extend(workers[n](f"decode {K} {pos} {rnd + 10 * t}")["ms"])
                meter.stop(f"{t} threads: decode rounds at {L}")
                for n in long_names:
                    d = res[n]["long"]["decode"][str(t)] = summarize_decode(raw_long[n])
                    print(f"{n:>26} {t}T decode at {L}: {d['tok_s']:6.2f} tok/s", flush=True)
            for n in names:
                res[n]["worker"][str(t)] = {**workers[n].ready, **workers[n]("rss")}
        finally:
            for w in workers.values():
                w.close()
    return res


def llama_bench(llama: dict, gguf: Path, args, log: Path, commands: list) -> list:
    cmd = ["nice", "-n", "0", Path(llama["bin"]) / "llama-bench", "-m", gguf, "-t",
           ",".join(map(str, args.threads)), "-p", str(args.prefill_tokens), "-n", str(args.decode_steps),
           "-r", "3", "-o", "json"]
    commands.append(cmd)
    p = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=engine_env(cmd))
    with open(log, "a") as f:
        f.write(p.stderr)
    try:
        rows = json.loads(p.stdout)
    except json.JSONDecodeError:
        return [{"error": p.stderr[-500:]}]
    return [{k: r.get(k) for k in ("n_threads", "n_prompt", "n_gen", "avg_ts", "stddev_ts", "flash_attn",
                                   "type_k", "n_batch", "n_ubatch")} for r in rows]


# ------------------------------------------------------------------------------------------------ main

def versions(llama: dict) -> dict:
    out = {"llama_cpp_python_sdist": LLAMA_CPP_PYTHON_VERSION, "llama_cpp_commit": llama.get("commit"),
           "python": platform.python_version()}
    for mod in ("executorch", "torch", "numpy", "sentencepiece", "transformers", "safetensors"):
        try:
            from importlib.metadata import version

            out[mod] = version(mod)
        except Exception:  # noqa: BLE001
            out[mod] = None
    gguf_py = Path(llama["source"]) / "gguf-py" / "pyproject.toml"
    m = re.search(r'^version = "([^"]+)"', gguf_py.read_text(), re.M) if gguf_py.exists() else None
    out["gguf_py_vendored"] = m.group(1) if m else None
    p = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    out["pocketllm_commit"] = p.stdout.strip() or None
    p = subprocess.run(["g++", "--version"], capture_output=True, text=True)
    out["gxx"] = p.stdout.splitlines()[0] if p.stdout else None
    return out


def cpu_model() -> str:
    fields = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return f"{fields.get('model name', platform.processor())} (family {fields.get('cpu family')})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True, help="the HF checkpoint the bundles were exported from")
    ap.add_argument("--bundle", action="append", default=[], help="NAME=BUNDLE_DIR (repeatable)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="llama.cpp sdist, source and build")
    ap.add_argument("--work", type=Path, default=REPO / "out" / "vs_llamacpp", help="GGUF files, drivers, logs")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "vs_llamacpp",
                    help="path stem: STEM.json and STEM.png")
    ap.add_argument("--jobs", type=int, default=1, help="parallel compile jobs for llama.cpp (2 if the machine is quiet)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prefill-tokens", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--long-context", type=int, default=16384, help="0: skip the long-context part")
    ap.add_argument("--long-threads", default="2")
    ap.add_argument("--long-rounds", type=int, default=3)
    ap.add_argument("--long-variants", default="all",
                    help=f"comma-separated variants timed at --long-context (all: '{Q4_0}' and every bundle); "
                         "each prefills that many tokens first, minutes apiece")
    ap.add_argument("--rss-tokens", type=int, default=64)
    ap.add_argument("--rss-threads", type=int, default=2)
    ap.add_argument("--kernels", type=Path, default=REPO / "kernels" / "build" / "libpocketllm_kernels.so")
    ap.add_argument("--skip-speed", action="store_true", help="conversion check and RSS only")
    ap.add_argument("--build-only", action="store_true", help="build llama.cpp and the drivers, then stop")
    args = ap.parse_args(argv)
    args.threads = parse_ints(args.threads)
    args.long_threads = parse_ints(args.long_threads)
    args.bundles = parse_bundles(args.bundle)
    args.long_variants = parse_long_variants(args.long_variants, list(args.bundles))
    if args.long_context:
        long_decode_positions(args.long_context, args.decode_steps, args.long_rounds, args.long_threads,
                              args.long_context + 256)  # the bundles' cache is checked again once read
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    bundles = args.bundles
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    log = work / "run.log"
    commands: dict = {"invocation": [sys.executable, *sys.argv], "build": [], "drivers": [], "convert": [],
                      "llama_bench": []}
    load_start = {"loadavg": list(os.getloadavg()), "top": top_processes()}

    llama = ensure_llamacpp(args.cache, args.jobs, commands["build"])
    exes = build_drivers(llama, work, commands["drivers"])
    if args.build_only:
        print(json.dumps({k: str(v) for k, v in exes.items()}))
        return
    ggufs = convert(args.checkpoint, llama, work, commands["convert"])
    binfo = {n: read_bundle(n, p) for n, p in bundles.items()}
    capacity = min([b["max_context"] for b in binfo.values()] or [args.long_context + 256])

    # ---- conversion exactness: llama.cpp f32 (f32 KV) vs the numpy reference on the checkpoint
    vocab = int(json.loads((args.checkpoint / "config.json").read_text())["vocab_size"])
    probe = [t % vocab for t in (1, 523, 7788, 42, 3000, 60000, 11, 9)]
    ref = reference_logits(args.checkpoint, probe)
    # Flash attention off: llama.cpp's CPU flash-attention path rounds the queries to f16 (the timed runs keep
    # llama.cpp's default, auto = on; its difference is recorded beside the exact one).
    f32cmd = [exes["llamacpp_runner"], ggufs["f32"], "--ctx", 256, "--kv", "f32", "--threads", 2]
    w = Worker("llama.cpp f32", f32cmd + ["--fa", "off"], log)
    conversion = {"gguf_f32": str(ggufs["f32"]), "tolerance": EXACT_TOLERANCE, "kv_cache": "f32",
                  "flash_attn": "off", **logits_diff(w, probe, ref, work / "logits.bin")}
    w.close()
    w = Worker("llama.cpp f32 fa", f32cmd + ["--fa", "auto"], log)
    conversion["max_abs_diff_flash_attn_auto"] = logits_diff(w, probe, ref, work / "logits.bin")["max_abs_diff"]
    w.close()
    conversion["exact"] = conversion["max_abs_diff"] <= EXACT_TOLERANCE
    print(f"conversion: max |llama.cpp f32 - numpy reference| = {conversion['max_abs_diff']:.2e}", flush=True)
    et_parity = {}
    for n, b in binfo.items():
        refdir = Path(b["bundle"]) / (b["manifest"].get("reference") or {}).get("dir", "reference")
        q = b["manifest"].get("quantization") or {}
        # the reference runs a W4A8 bundle's int8 activations; 8da4w (XNNPACK's dynamic int8) has no exact twin
        acts = "int8" if q.get("activations") == "int8" and q.get("scheme") == "any4" else "fp32"
        kv = b["manifest"]["targets"]["executorch"].get("kv_cache_dtype", "float32")
        w = Worker(n, et_command(exes["et_runner"], b, args.kernels) + ["--threads", 2], log)
        et_parity[n] = logits_diff(w, probe, reference_logits(refdir if refdir.exists() else args.checkpoint, probe,
                                                              activations=acts, kv_cache_dtype=kv), work / "logits.bin")
        et_parity[n]["reference_kv_cache_dtype"] = kv
        et_parity[n]["reference_weights"] = str(refdir if refdir.exists() else args.checkpoint)
        et_parity[n]["reference_activations"] = acts
        et_parity[n]["contract"] = ("exact" if klass_exact(q) else "w4a8" if acts == "int8" else "top-1 only")
        w.close()
        print(f"{n}: C++ ExecuTorch runner vs numpy reference max |diff| {et_parity[n]['max_abs_diff']:.2e}")
    conversion["et_runner_vs_reference"] = et_parity

    # ---- speed, one sitting
    variants: dict = {}
    for key in (Q4_0, Q4_0_F32HEAD):
        variants[key] = {"engine": "llama.cpp", "file": str(ggufs[key]), "file_mib": ggufs[key].stat().st_size / 2**20}
    for n, b in binfo.items():
        variants[n] = {"engine": "executorch", "bundle": b["bundle"], "file": str(b["pte"]),
                       "file_mib": b["pte"].stat().st_size / 2**20,
                       "bundle_mib": sum(f.stat().st_size for f in Path(b["bundle"]).rglob("*") if f.is_file()) / 2**20,
                       "class": classify_bundle(b["manifest"]), "quantization": b["manifest"].get("quantization"),
                       "prefill_logits": b["prefill_logits"], "prefill_chunk": b["chunk"],
                       "max_context": b["max_context"], "llama_ops": b["llama_ops"],
                       "attention": (b["manifest"].get("attention") or {}).get("per_layer", [None])[0]}
    meter = LoadMeter()
    bench_rows = []
    if not args.skip_speed:
        engines = {Q4_0: "llama.cpp", Q4_0_F32HEAD: "llama.cpp", **{n: "executorch" for n in binfo}}

        def make_worker(n: str, t: int) -> Worker:
            if engines[n] == "llama.cpp":
                cmd = [exes["llamacpp_runner"], ggufs[n], "--ctx", capacity, "--batch", 512, "--threads", t]
            else:
                cmd = et_command(exes["et_runner"], binfo[n], args.kernels) + ["--threads", t]
            w = Worker(f"{n} {t}T", cmd, log)
            w.ready["capacity"] = capacity if engines[n] == "llama.cpp" else binfo[n]["max_context"]
            return w

        speed = sitting(make_worker, engines, args, meter)
        for n, r in speed.items():
            variants[n].update(r)
        meter.start([])
        bench_rows = llama_bench(llama, ggufs[Q4_0], args, log, commands["llama_bench"])
        meter.stop("llama-bench")

    # ---- peak RSS of a generation from C++
    rss: dict = {"tokens": args.rss_tokens, "prompt": 16, "threads": args.rss_threads, "runs": {}}
    gen = ["--generate", args.rss_tokens, "--prompt", 16, "--threads", args.rss_threads]
    for key in (Q4_0, Q4_0_F32HEAD):
        rss["runs"][key] = time_v([exes["llamacpp_runner"], ggufs[key], "--ctx", capacity, *gen], log)
        variants[key]["peak_rss_mib"] = rss["runs"][key]["max_rss_mib"]
        print(f"{key} (context {capacity}): peak RSS {rss['runs'][key]['max_rss_mib']:.0f} MiB", flush=True)
    # for reference: llama.cpp's CLI default context (4096), a smaller KV cache than the bundles hold
    rss["runs"][f"{Q4_0} ctx 4096"] = time_v([exes["llamacpp_runner"], ggufs[Q4_0], "--ctx", 4096, *gen], log)
    for n, b in binfo.items():
        for mode in ("mmap", "mlock"):
            for ops in ("builtin", "wheel") if b["llama_ops"] else ("none",):
                if ops == "builtin" and not set(b["llama_ops"]) <= {"llama::update_cache.out"}:
                    continue
                label = f"{n} {mode} llama-ops={ops}"
                rss["runs"][label] = time_v(et_command(exes["et_runner"], b, args.kernels, mode, ops) + gen, log,
                                            fatal=mode == "mmap")
                print(f"{label}: peak RSS {rss['runs'][label]['max_rss_mib']} MiB", flush=True)
        own = [v for k, v in rss["runs"].items() if k.startswith(f"{n} mmap") and "wheel" not in k]
        variants[n]["peak_rss_mib"] = (own or [rss["runs"][f"{n} mmap llama-ops=wheel"]])[0]["max_rss_mib"]
        variants[n]["peak_rss_mib_wheel_llama_ops"] = rss["runs"].get(f"{n} mmap llama-ops=wheel", {}).get("max_rss_mib")
    ref_rss = variants[Q4_0]["peak_rss_mib"]
    rss["ratio_vs_q4_0"] = {n: variants[n]["peak_rss_mib"] / ref_rss for n in binfo}

    top = compute_ratios(variants)
    result = {
        **top,
        "variants": variants,
        "conversion": conversion,
        "rss": rss,
        "llama_bench_q4_0": bench_rows,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "machine": platform.machine(),
                    "start": load_start, "end": {"loadavg": list(os.getloadavg()), "top": top_processes()},
                    "samples": meter.samples,
                    "other_busy_cores_mean": (statistics.mean(s["other_busy_cores"] for s in meter.samples
                                                              if s["other_busy_cores"] is not None)
                                              if meter.samples else None)},
        "versions": versions(llama),
        "llama_cpp_build": llama,
        "commands": {k: [" ".join(map(str, c)) for c in v] if k != "invocation" else " ".join(map(str, v))
                     for k, v in commands.items()},
        "settings": {"threads": args.threads, "rounds": args.rounds, "prefill_tokens": args.prefill_tokens,
                     "decode_steps": args.decode_steps, "long_context": args.long_context,
                     "long_threads": args.long_threads, "long_rounds": args.long_rounds,
                     "long_variants": args.long_variants, "kv_capacity": capacity,
                     "llama_cpp_kv": "f16 (default)", "llama_cpp_omp_wait_policy": "default (unset)",
                     "executorch_env": ENV, "llama_cpp_n_batch": 512, "checkpoint": str(args.checkpoint)},
        "method": __doc__.split("Steps", 1)[1].strip(),
    }
    problems = check_result(result)
    if problems:
        print("result shape problems:", problems, file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = Path(f"{args.out}.json"), Path(f"{args.out}.png")
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    plot(result, png_path)
    print(json.dumps({k: result[k] for k in TOP_LEVEL_KEYS[:6]}, indent=1))
    print(f"wrote {json_path} and {png_path}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = result["variants"]
    names = list(variants)
    threads = result["settings"]["threads"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))

    def bars(ax, getter, title, per_thread=True, ts=threads):
        width = 0.8 / (len(ts) if per_thread else 1)
        for i, t in enumerate(ts if per_thread else [None]):
            raw = [getter(variants[n], t) for n in names]
            vals = [r or 0 for r in raw]
            xs = [j + (i - (len(ts) - 1) / 2) * width if per_thread else j for j in range(len(names))]
            b = ax.bar(xs, vals, width, label=f"{t} threads" if per_thread else None)
            big = max(vals or [0]) > 20
            ax.bar_label(b, labels=["not run" if r is None else f"{r:.0f}" if big else f"{r:.1f}" for r in raw],
                         fontsize=7)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=15, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if per_thread:
            ax.legend(fontsize=8)

    def get(v, *path):
        for p in path:
            v = v.get(p) if isinstance(v, dict) else None
        return v

    s = result["settings"]
    def fmt(x):
        return "-" if x is None else f"{x:.2f}x"

    bars(axes[0][0], lambda v, t: get(v, "decode", t, "tok_s") or get(v, "decode", str(t), "tok_s"),
         f"decode tok/s, empty cache (best vs Q4_0 at 2 threads {fmt(result.get('best_decode_ratio_vs_q4_0'))}, "
         f"exact any4 {fmt(result.get('any4_exact_decode_ratio_vs_q4_0'))})")
    bars(axes[0][1], lambda v, t: get(v, "prefill", t, "tok_s") or get(v, "prefill", str(t), "tok_s"),
         f"prefill {s['prefill_tokens']} tokens, tok/s (logits for every position on both sides)")
    bars(axes[1][0], lambda v, t: get(v, "long", "decode", t, "tok_s") or get(v, "long", "decode", str(t), "tok_s"),
         f"decode tok/s after a {s['long_context']}-token prefill (best vs Q4_0 "
         f"{fmt(result.get('best_long_decode_ratio_vs_q4_0'))})", ts=s["long_threads"])
    ax = axes[1][1]
    x = range(len(names))
    b1 = ax.bar([i - 0.2 for i in x], [variants[n]["file_mib"] for n in names], 0.4, label="file MiB (.gguf / .pte)")
    b2 = ax.bar([i + 0.2 for i in x], [variants[n].get("peak_rss_mib") or 0 for n in names], 0.4,
                label=f"peak RSS MiB, {result['rss']['tokens']}-token generation from C++")
    ax.bar_label(b1, fmt="%.0f", fontsize=7)
    ax.bar_label(b2, fmt="%.0f", fontsize=7)
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=15, fontsize=8)
    ax.set_title("size and memory", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    load = result["machine"].get("other_busy_cores_mean")
    fig.suptitle(f"pocketllm vs llama.cpp, same weights ({result['machine']['cpu']}, {result['machine']['cores']} "
                 f"cores; other processes used {load if load is None else round(load, 2)} cores meanwhile)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
