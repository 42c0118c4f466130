"""SmallThinker 4b-a0.6b (any4) through ExecuTorch: expert-sparse vs all-experts, against a dense MiniCPM-shaped model
with the same active parameter count, and memory with and without an expert budget (issue 14 item 3).

Variants (each a bundle exported from the same any4 checkpoint, except the yardstick):
    sparse            --experts inline: experts stacked in the .pte, pocketllm::moe_ffn_any4 reads the routed 4 of 32
    all-experts       --experts all: every expert runs (any4_linear x 96 per layer) with zero weight for unchosen ones
                      (the MoE blocks' own float ops outside XNNPACK, whose partitioner outgrows 24 GB on them)
    store             --experts file: experts.bin memory-mapped by the expert store (no budget)
    store-1GiB        the same bundle with a 1 GiB expert budget (LRU of expert slots, prefetch from the router)
    sparse-portable   the sparse export lowered without XNNPACK (executorch.xnnpack=false), to set beside an
                      all-experts bundle built that way (speedup_decode_same_lowering)
    dense             MiniCPM4-shaped (hidden 1536, 32 layers, 12/2 heads of 128, vocab 151936, tied), one SwiGLU
                      MLP of 3072 = 4 x 768: the active parameters of one SmallThinker token, any4 the same way

Timing and memory: each measurement is a child process (benchmarks/moe_decode.cpp: ExecuTorch's C++ Module, the
program memory-mapped without mlock as on a phone, no Python) that loads a bundle, prefills PROMPT random tokens in
one call, decodes DECODE tokens greedily, and reports tok/s, VmRSS after loading and the decode phase's peak
(VmHWM, reset after loading). Rounds run every variant once, in an order rotated each round (noise on this shared
machine hits all alike); reported numbers are medians over rounds. 2 threads.

Long steps run once and are reused (BENCH_DIR, default out/bench): the checkpoints (init-checkpoint; `pocketllm
quantize --scheme any4`, ~1 h for the 4B at nice 19 on the shared 2-core machine) and the exports. Run:

    nice -n 19 /usr/bin/time -v .venv/bin/pocketllm init-checkpoint --arch smallthinker --preset 4b-a0.6b \
        --out out/bench/st4b > out/bench/st4b.init.log 2>&1
    nice -n 19 /usr/bin/time -v .venv/bin/pocketllm quantize --checkpoint out/bench/st4b --scheme any4 \
        --out out/bench/st4b-any4 > out/bench/st4b.quant.log 2>&1
    nice -n 19 .venv/bin/python benchmarks/moe_speed.py --rounds 3      # dense checkpoint, exports, timing, plot

The LM head is quantize's choice (default: int8, shared by every variant; `results["lm_head"]` says which). For the
any4-head sitting, quantize with `--lm-head any4` into another BENCH_DIR (st4b linked in) and pass `--lm-head any4`
here too, for the dense yardstick's own quantize step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ET = REPO / ".venv/lib/python3.11/site-packages/executorch"
DRIVER = REPO / "out" / "moe_decode"
POCKETLLM = REPO / ".venv" / "bin" / "pocketllm"
NICE = ["nice", "-n", "19"]
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_NUM_THREADS": "1"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_logged(cmd: list[str], what: str, time_log: Path | None = None) -> float:
    """Run a long step (under /usr/bin/time -v into time_log when given); returns its wall time in seconds."""
    log(f"{what}: {' '.join(map(str, cmd))}")
    if time_log is not None:
        cmd = ["/usr/bin/time", "-v", "-o", str(time_log), *cmd]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=ENV)
    dt = time.perf_counter() - t0
    log(f"{what}: {dt / 60:.1f} min")
    return dt


def max_rss_mib(time_log: Path) -> float | None:
    for line in time_log.read_text().splitlines() if time_log.is_file() else []:
        if "Maximum resident set size" in line:
            return round(int(line.rsplit(":", 1)[1]) / 1024, 1)
    return None


# ------------------------------------------------------------------------------------------ checkpoints + bundles
def dense_config(st_config: dict) -> dict:
    """MiniCPM4 keys, SmallThinker 4b-a0.6b's attention, vocabulary and tied head, and one SwiGLU MLP as wide as the
    4 routed experts (so one token touches the same parameter count): no muP scaling, dense attention, plain RoPE."""
    from pocketllm.export.families import preset_config

    c = preset_config("minicpm4", "0.5b")
    for key in ("rope_scaling", "sparse_config"):
        c.pop(key, None)
    moe_active = st_config["moe_num_active_primary_experts"] * st_config["moe_ffn_hidden_size"]
    c.update(vocab_size=st_config["vocab_size"], hidden_size=st_config["hidden_size"], intermediate_size=moe_active,
             num_hidden_layers=st_config["num_hidden_layers"], num_attention_heads=st_config["num_attention_heads"],
             num_key_value_heads=st_config["num_key_value_heads"], rope_theta=st_config["rope_theta"],
             tie_word_embeddings=st_config["tie_word_embeddings"], bos_token_id=st_config["bos_token_id"],
             eos_token_id=st_config["eos_token_id"], scale_emb=1, dim_model_base=st_config["hidden_size"],
             scale_depth=1.0, max_position_embeddings=st_config["max_position_embeddings"])
    return c


def make_dense_checkpoint(st: Path, out: Path) -> None:
    """Random bf16 weights for dense_config, with SmallThinker's tokenizer files (same vocabulary)."""
    import torch

    from pocketllm.export.atomic import atomic_directory
    from pocketllm.export.checkpoint_writer import write_weights
    from pocketllm.export.init_checkpoint import random_tensors, write_config

    config = dense_config(json.loads((st / "config.json").read_text()))
    tensors, total = random_tensors(config, torch.bfloat16, 1)
    with atomic_directory(out) as tmp:
        write_config(tmp, config)
        for f in st.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                shutil.copy(f, tmp / f.name)
        write_weights(tmp, tensors, total_bytes=total)


def active_params(config: dict) -> dict:
    """Parameters one token reads, by part (embedding row gather excluded; the tied head counted once)."""
    H, L, V = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    hd = config.get("head_dim") or H // config["num_attention_heads"]
    attn = H * hd * config["num_attention_heads"] * 2 + 2 * H * hd * config["num_key_value_heads"]
    if "moe_ffn_hidden_size" in config:
        ffn = 3 * H * config["moe_ffn_hidden_size"] * config["moe_num_active_primary_experts"]
        router = H * config["moe_num_primary_experts"]
        total_ffn = 3 * H * config["moe_ffn_hidden_size"] * config["moe_num_primary_experts"]
    else:
        ffn, router, total_ffn = 3 * H * config["intermediate_size"], 0, 3 * H * config["intermediate_size"]
    return {"attention": L * attn, "ffn_active": L * ffn, "router": L * router, "lm_head": V * H,
            "active_total": L * (attn + ffn + router) + V * H, "ffn_total": L * total_ffn}


def head_scheme(ckpt: Path) -> str:
    """How a quantized checkpoint stores its LM head (a tied model: the shared table), from its quantization plan."""
    config = json.loads((ckpt / "config.json").read_text())
    modules = config["quantization_config"]["modules"]
    entry = modules.get("lm_head")
    if entry is None and config.get("tie_word_embeddings"):
        entry = modules.get("model.embed_tokens")
    return entry["scheme"] if entry else "none"


def export(ckpt: Path, out: Path, flags: list[str], args) -> float | None:
    if (out / "manifest.json").is_file():
        return None
    return run_logged(NICE + [str(POCKETLLM), "export", "--checkpoint", str(ckpt), "--max-context",
                              str(args.max_context), "--prefill-chunk", str(args.prompt), "--threads", "2",
                              "--out", str(out), "--force", *flags], f"export {out.name}",
                      out.with_name(out.name + ".time"))


def build_driver() -> None:
    src = REPO / "benchmarks" / "moe_decode.cpp"
    sources = (src, REPO / "benchmarks" / "driver_common.h")
    if DRIVER.is_file() and DRIVER.stat().st_mtime > max(p.stat().st_mtime for p in sources):
        return
    DRIVER.parent.mkdir(exist_ok=True)
    subprocess.run(["c++", "-O2", "-std=c++17", "-Wno-deprecated-declarations", f"-I{ET}/include",
                    f"-I{ET}/include/executorch/runtime/core/portable_type/c10", "-DC10_USING_CUSTOM_GENERATED_MACROS",
                    str(src), "-o", str(DRIVER), "-Wl,--no-as-needed", f"-L{ET}/lib", "-lexecutorch",
                    "-lexecutorch_threadpool", "-lexecutorch_backend_xnnpack", "-lexecutorch_kernels_optimized",
                    f"-Wl,-rpath,{ET}/lib", "-ldl"], check=True)


def libpython() -> str:
    import sysconfig

    return str(Path(sysconfig.get_config_var("LIBDIR")) / sysconfig.get_config_var("LDLIBRARY"))


def stacking_child(ckpt: Path) -> None:
    """Memory of the inline swap alone (a child process): RSS after loading the any4 model, the peak while its
    experts are stacked layer by layer (each expert freed as copied), and RSS after."""
    import torch

    from pocketllm.export.nn.load import load_model
    from pocketllm.export.targets.executorch.swaps import use_stacked_experts

    def status(key: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return round(int(line.split()[1]) / 1024, 1)
        return -1.0

    torch.set_num_threads(1)
    model, _ = load_model(ckpt, max_context=1024, dtype="fp32")
    loaded, peak_load = status("VmRSS:"), status("VmHWM:")
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    use_stacked_experts(model)
    print(json.dumps({"rss_after_load_mib": loaded, "peak_load_mib": peak_load,
                      "peak_while_stacking_mib": status("VmHWM:"), "rss_after_stacking_mib": status("VmRSS:"),
                      "stacking_s": round(time.perf_counter() - t0, 1)}))


def measure_stacking(ckpt: Path) -> dict:
    out = subprocess.run(NICE + [sys.executable, __file__, "--stacking-child", str(ckpt)], check=True, env=ENV,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ measurement
def measure(bundle: Path, args, budget_mib: float | None = None, prefetch: bool = True) -> dict:
    """One child process: load, prefill, decode. Adds the child's ru_maxrss (whole life, loading included)."""
    cmd = [str(DRIVER), str(bundle / "model.pte"), str(REPO / "kernels/build/libpocketllm_kernels.so"),
           str(ET / "extension/llm/custom_ops/libcustom_ops_aot_lib.so"), str(args.threads), str(args.prompt),
           str(args.decode), "--preload", libpython()]
    if (bundle / "experts.bin").is_file():
        cmd += ["--store", str(bundle / "experts.bin"), str(budget_mib or 0), str(int(prefetch))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=ENV)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({status})")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["ru_maxrss_mib"] = round(usage.ru_maxrss / 1024, 1)
    return result


def median_of(rows: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in rows), 3)


def summarize(rows: list[dict]) -> dict:
    keys = ("prefill_tok_s", "decode_tok_s", "decode_median_ms", "rss_loaded_mib", "peak_decode_mib",
            "ru_maxrss_mib", "rss_after_libraries_mib", "load_s")
    out = {k: median_of(rows, k) for k in keys}
    out["peak_decode_mib_max"] = max(r["peak_decode_mib"] for r in rows)
    if "store" in rows[0]:
        out["store"] = rows[-1]["store"]
    out["runs"] = rows
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["variants"])
    v = results["variants"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.4))
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#7f7f7f", "#17becf"]
    for ax, key, title in ((axes[0], "decode_tok_s", "decode tok/s"), (axes[1], "prefill_tok_s",
                                                                       f"prefill tok/s ({results['prompt']} tokens)")):
        vals = [v[n][key] for n in names]
        bars = ax.bar(range(len(names)), vals, color=colors[:len(names)])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.set_title(f"{title}, {results['threads']} threads")
        ax.grid(axis="y", alpha=0.3)
    mem = [v[n]["peak_decode_mib"] / 1024 for n in names]
    bars = axes[2].bar(range(len(names)), mem, color=colors[:len(names)])
    axes[2].bar_label(bars, fmt="%.2f", fontsize=8)
    if results["memory"]:
        bound = results["memory"]["bound_mib"] / 1024
        axes[2].axhline(bound, color="k", ls="--", lw=1)
        axes[2].text(len(names) - 0.5, bound, "non-expert + 1 GiB + 300 MiB", ha="right", va="bottom", fontsize=7)
    axes[2].set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    axes[2].set_title("peak RSS while decoding (GiB)")
    axes[2].grid(axis="y", alpha=0.3)
    same = results.get("speedup_decode_same_lowering")
    speedup = (f"expert-sparse decode {results['speedup_decode']:.1f}x all-experts" if results["speedup_decode"]
               else f"expert-sparse decode {same:.1f}x all-experts (both without XNNPACK)" if same
               else f"not measured: {', '.join(results['not_measured'])}")
    fig.suptitle(f"SmallThinker 4b-a0.6b any4, {results.get('lm_head', 'int8')} head (random weights), ExecuTorch, "
                 f"{platform.machine()}, load "
                 f"{results['machine']['load_average_before_during_after'][0][0]:.0f} on {os.cpu_count()} cores: "
                 f"{speedup}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench-dir", type=Path, default=Path(os.environ.get("BENCH_DIR", REPO / "out" / "bench")))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128, help="prefill tokens (one call; also --prefill-chunk)")
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--max-context", type=int, default=1024)
    ap.add_argument("--budget-mib", type=float, default=1024)
    ap.add_argument("--lm-head", default="auto", help="--lm-head of the dense yardstick's quantize step (the "
                    "SmallThinker checkpoint is quantized beforehand: see the docstring)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "moe_speed")
    ap.add_argument("--variants", type=lambda v: [x.strip() for x in v.split(",") if x.strip()], default=None,
                    help="time only these (comma-separated: sparse, all-experts, store, store-1GiB, dense, "
                         "sparse-portable)")
    ap.add_argument("--no-export", dest="export", action="store_false",
                    help="measure the bundles that exist; export none")
    ap.add_argument("--no-stacking", dest="stacking", action="store_false",
                    help="skip the separate measurement of the inline swap's memory (loads the 4B model once more)")
    ap.add_argument("--stacking-child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stacking_child:
        return stacking_child(args.stacking_child)
    B = args.bench_dir
    st, st_any4, dense, dense_any4 = B / "st4b", B / "st4b-any4", B / "dense4b-a0.6b", B / "dense4b-a0.6b-any4"
    if not (st_any4 / "config.json").is_file():
        sys.exit(f"{st_any4} missing: run init-checkpoint and quantize first (see the docstring)")
    steps = {}
    for name in ("st4b.init", "st4b.quant"):  # the docstring's commands, run under /usr/bin/time -v into these logs
        path = B / f"{name}.log"
        for line in path.read_text().splitlines() if path.is_file() else []:
            if "Elapsed (wall clock)" in line:
                steps[f"{name}_wall"] = line.rsplit(": ", 1)[1]
            elif "Maximum resident set size" in line:
                steps[f"{name}_max_rss_mib"] = round(int(line.rsplit(":", 1)[1]) / 1024, 1)
    if not (dense / "config.json").is_file():
        t0 = time.perf_counter()
        make_dense_checkpoint(st, dense)
        steps["dense_checkpoint_min"] = round((time.perf_counter() - t0) / 60, 1)
    if not (dense_any4 / "config.json").is_file():
        steps["dense_quantize_min"] = round(run_logged(NICE + [str(POCKETLLM), "quantize", "--checkpoint", str(dense),
                                                               "--scheme", "any4", "--lm-head", args.lm_head,
                                                               "--out", str(dense_any4)],
                                                       "quantize dense") / 60, 1)
    bundles = {"sparse": (st_any4, B / "st-sparse", []), "all-experts": (st_any4, B / "st-all", ["--experts", "all"]),
               "store": (st_any4, B / "st-store", ["--experts", "file"]), "dense": (dense_any4, B / "dense", []),
               "sparse-portable": (st_any4, B / "st-sparse-portable", ["--target-option", "executorch.xnnpack=false"])}
    if args.variants:  # only these (and only their exports)
        bundles = {n: v for n, v in bundles.items() if n in args.variants or n == "store" and any(
            x.startswith("store") for x in args.variants)}
    for name, (ckpt, out, flags) in bundles.items():
        dt = export(ckpt, out, flags, args) if args.export else None
        if dt is not None:
            steps[f"export_{name}_min"] = round(dt / 60, 1)
    missing = [n for n, (_, b, _) in bundles.items() if not (b / "manifest.json").is_file()]
    if missing:
        log(f"--no-export: no bundle yet for {', '.join(missing)}; measuring the others")
        bundles = {n: v for n, v in bundles.items() if n not in missing}
    build_driver()
    stacking = None
    if args.stacking:
        log("memory of stacking the experts (inline swap) alone")
        stacking = measure_stacking(st_any4)
        log(f"stacking: {stacking}")

    variants = {"sparse": (B / "st-sparse", None), "all-experts": (B / "st-all", None),
                "store": (B / "st-store", 0), f"store-{args.budget_mib / 1024:g}GiB": (B / "st-store", args.budget_mib),
                "dense": (B / "dense", None), "sparse-portable": (B / "st-sparse-portable", None)}
    variants = {n: v for n, v in variants.items() if (v[0] / "manifest.json").is_file()
                and (not args.variants or n in args.variants)}
    rows: dict[str, list[dict]] = {n: [] for n in variants}
    uptimes = [os.getloadavg()]
    names = list(variants)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            bundle, budget = variants[name]
            res = measure(bundle, args, budget)
            rows[name].append(res)
            log(f"round {r + 1} {name}: decode {res['decode_tok_s']:.2f} tok/s, prefill {res['prefill_tok_s']:.1f} "
                f"tok/s, peak decode RSS {res['peak_decode_mib']:.0f} MiB")
        uptimes.append(os.getloadavg())

    summary = {n: summarize(r) for n, r in rows.items()}
    budget_name = f"store-{args.budget_mib / 1024:g}GiB"
    memory, bound = None, float("nan")
    if budget_name in summary and "store" in summary:
        manifest = json.loads((B / "st-store" / "manifest.json").read_text())
        store = manifest["targets"]["executorch"]["expert_store"]
        non_expert = manifest["files"]["model.pte"]["size"] / 2**20
        bound = non_expert + args.budget_mib + 300
        libtorch = summary[budget_name]["rss_after_libraries_mib"]
        memory = {"non_expert_weights_mib": round(non_expert, 1), "expert_file_mib": round(store["bytes"] / 2**20, 1),
                  "budget_mib": args.budget_mib, "bound_mib": round(bound, 1),
                  "peak_decode_mib_with_budget": summary[budget_name]["peak_decode_mib_max"],
                  "peak_decode_mib_unbounded": summary["store"]["peak_decode_mib_max"],
                  "libtorch_in_driver_mib": libtorch,
                  "within_bound": summary[budget_name]["peak_decode_mib_max"] <= bound,
                  "within_bound_without_libtorch": summary[budget_name]["peak_decode_mib_max"] - libtorch <= bound}

    def ratio(a: str, b: str, key: str) -> float | None:  # None when a variant has no bundle (--no-export)
        return round(summary[a][key] / summary[b][key], 2) if a in summary and b in summary else None

    st_cfg = json.loads((st / "config.json").read_text())
    results = {
        "command": (f"nice -n {os.nice(0)} " if os.nice(0) else "") + ".venv/bin/python benchmarks/moe_speed.py "
                   + " ".join(sys.argv[1:]),
        "machine": {"arch": platform.machine(), "cpus": os.cpu_count(),
                    "load_average_before_during_after": [[round(x, 2) for x in u] for u in uptimes]},
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "threads": args.threads, "prompt": args.prompt, "decode": args.decode, "rounds": args.rounds,
        "max_context": args.max_context, "load_mode": "mmap (no mlock)", "lm_head": head_scheme(st_any4),
        "dense_lm_head": head_scheme(dense_any4) if (dense_any4 / "config.json").is_file() else None,
        "speedup_decode": ratio("sparse", "all-experts", "decode_tok_s"),
        "speedup_prefill": ratio("sparse", "all-experts", "prefill_tok_s"),
        # both lowered without XNNPACK (the all-experts 4B cannot be lowered with it here): the experts alone differ
        "speedup_decode_same_lowering": ratio("sparse-portable", "all-experts", "decode_tok_s"),
        "speedup_prefill_same_lowering": ratio("sparse-portable", "all-experts", "prefill_tok_s"),
        "dense_over_sparse_decode": ratio("dense", "sparse", "decode_tok_s"),
        "dense_over_sparse_prefill": ratio("dense", "sparse", "prefill_tok_s"),
        "budget_over_unbounded_decode": ratio(budget_name, "store", "decode_tok_s"),
        "store_over_sparse_decode": ratio("store", "sparse", "decode_tok_s"),
        "not_measured": missing,
        "active_params": {"smallthinker": active_params(st_cfg),
                          "dense": active_params(json.loads((dense / "config.json").read_text()))},
        "memory": memory,
        "bundle_mib": {n: round(sum(e["size"] for e in json.loads((b / "manifest.json").read_text())["files"].values())
                                / 2**20, 1) for n, (_, b, _) in bundles.items()},
        "export": {n: {"timings": json.loads((b / "manifest.json").read_text())["export"]["timings"],
                       "peak_rss_mib": json.loads((b / "manifest.json").read_text())["export"]["peak_rss_mib"],
                       "time_v_max_rss_mib": max_rss_mib(b.with_name(b.name + ".time"))}
                   for n, (_, b, _) in bundles.items()},
        "steps": steps,
        "stacking_memory": stacking,
        "variants": summary,
    }
    if results["dense_lm_head"] not in (None, results["lm_head"]):
        log(f"warning: the dense yardstick's LM head is {results['dense_lm_head']}, "
            f"SmallThinker's {results['lm_head']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    log(f"speedup_decode {results['speedup_decode']}x (same lowering {results['speedup_decode_same_lowering']}x); "
        f"dense/sparse {results['dense_over_sparse_decode']}x; budget peak "
        f"{memory['peak_decode_mib_with_budget'] if memory else '-'} MiB (bound {bound:.0f}); "
        f"wrote {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
