"""benchmarks/vs_llamacpp.py: the pure parts (arguments, positions, summaries, ratios, result shape, time -v).
No llama.cpp build, no bundle, no C++ here."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_llamacpp.py"


@pytest.fixture(scope="module")
def vs():
    spec = importlib.util.spec_from_file_location("vs_llamacpp", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parse_bundles(vs):
    assert vs.parse_bundles(["any4=out/a", "w4a8=/x/y=z"]) == {"any4": Path("out/a"), "w4a8": Path("/x/y=z")}
    for bad in (["any4"], ["=dir"], ["a=x", "a=y"], ["llama.cpp Q4_0=x"], ["a="]):
        with pytest.raises(ValueError):
            vs.parse_bundles(bad)


def test_llama_cpp_keeps_its_openmp_defaults(vs, monkeypatch):
    """PASSIVE waits halve llama.cpp's 2-thread decode (its OpenMP threads sleep between graph launches): its
    binaries run without it, every other child (the ExecuTorch drivers) with the passive policy."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    for cmd in (["/c/bin/llamacpp_runner", "m.gguf"], ["nice", "-n", "0", "/b/llama-bench", "-m", "m.gguf"],
                [Path("/c/bin/llama-quantize"), "a", "b"]):
        env = vs.engine_env(cmd)
        assert "OMP_WAIT_POLICY" not in env and env["OPENBLAS_NUM_THREADS"] == "1", cmd
    assert vs.engine_env(["/w/bin/et_runner", "model.pte"])["OMP_WAIT_POLICY"] == "PASSIVE"


def test_parse_ints_and_rotate(vs):
    assert vs.parse_ints("1,2") == [1, 2]
    assert vs.parse_ints("2") == [2]
    for bad in ("", "0", "1,-2"):
        with pytest.raises(ValueError):
            vs.parse_ints(bad)
    names = ["a", "b", "c"]
    assert [vs.rotate(names, k) for k in range(4)] == [names, ["b", "c", "a"], ["c", "a", "b"], names]
    assert vs.rotate([], 3) == []


def test_long_decode_positions(vs):
    plan = vs.long_decode_positions(16384, 16, 3, [1, 2], 16640)
    assert plan[0] == (0, 1, 16384) and plan[1] == (0, 2, 16400) and plan[-1] == (2, 2, 16464)
    assert len(plan) == 6
    with pytest.raises(ValueError, match="cache holds"):
        vs.long_decode_positions(16384, 64, 3, [1, 2], 16640)


def test_summaries(vs):
    d = vs.summarize_decode([10.0, 20.0, 30.0, 1000.0])
    assert d["ms_median"] == 25.0 and d["tok_s"] == pytest.approx(40.0) and d["steps"] == 4
    assert d["tok_s_mean"] == pytest.approx(4000 / 1060)
    p = vs.summarize_prefill([1.0, 0.5, 2.0], 128)
    assert p["tok_s"] == 128.0 and p["calls"] == 3


def test_parse_time_v(vs):
    text = """\tCommand being timed: "x"
\tElapsed (wall clock) time (h:mm:ss or m:ss): 1:02.50
\tMaximum resident set size (kbytes): 532480
\tMajor (requiring I/O) page faults: 3
\tMinor (reclaiming a frame) page faults: 12345
\tExit status: 0
"""
    r = vs.parse_time_v(text)
    assert r == {"max_rss_mib": 520.0, "wall_s": 62.5, "major_faults": 3, "minor_faults": 12345, "exit_status": 0}
    assert vs.parse_time_v("Elapsed (wall clock) time (h:mm:ss or m:ss): 1:00:01")["wall_s"] == 3601


def test_parse_long_variants(vs):
    assert vs.parse_long_variants("all", ["any4", "w4a8"]) == [vs.Q4_0, "any4", "w4a8"]
    assert vs.parse_long_variants("w4a8", ["any4", "w4a8"]) == [vs.Q4_0, "w4a8"]
    assert vs.parse_long_variants(f"w4a8,{vs.Q4_0}", ["any4", "w4a8"]) == [vs.Q4_0, "w4a8"]
    with pytest.raises(ValueError, match="unknown"):
        vs.parse_long_variants("nope", ["any4"])


def fake_cache(vs, root: Path, stamp: str | None = None, binaries: bool = True) -> Path:
    sdist = root / "sdist" / f"llama_cpp_python-{vs.LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    sdist.parent.mkdir(parents=True)
    sdist.write_bytes(b"")
    src = vs.llama_source(root)
    src.mkdir(parents=True)
    (src / "CMakeLists.txt").write_text("")
    (root / "build" / "bin").mkdir(parents=True)
    if binaries:
        for b in ("llama-quantize", "llama-bench"):
            (root / "build" / "bin" / b).write_text("")
    if stamp is not None:
        (root / "build" / "pocketllm.stamp").write_text(stamp)
    return root


def test_cache_plan(vs, tmp_path):
    empty = vs.cache_plan(tmp_path / "none")
    assert empty["download"] and empty["extract"] and empty["build"]
    done = vs.cache_plan(fake_cache(vs, tmp_path / "done", vs.build_stamp()))
    assert not done["download"] and not done["extract"] and not done["build"]
    # other flags or targets, no stamp, or a binary missing: rebuild (the source is reused)
    stale = vs.cache_plan(fake_cache(vs, tmp_path / "stale", vs.build_stamp().replace("NATIVE=ON", "NATIVE=OFF")))
    assert stale["build"] and not stale["download"] and not stale["extract"]
    assert vs.cache_plan(fake_cache(vs, tmp_path / "nostamp"))["build"]
    assert vs.cache_plan(fake_cache(vs, tmp_path / "nobin", vs.build_stamp(), binaries=False))["build"]
    # an extracted source without the sdist is not downloaded again
    src_only = fake_cache(vs, tmp_path / "srconly", vs.build_stamp())
    next((src_only / "sdist").iterdir()).unlink()
    assert not vs.cache_plan(src_only)["download"]


def test_ensure_llamacpp_reuses_a_built_cache(vs, tmp_path, monkeypatch):
    cache = fake_cache(vs, tmp_path / "c", vs.build_stamp())
    ran = []
    monkeypatch.setattr(vs, "run", lambda cmd, *a, **k: ran.append(cmd))
    commands: list = []
    info = vs.ensure_llamacpp(cache, 1, commands)
    assert ran == [] and info["reused"] and info["build_s"] is None
    assert info["bin"] == str(cache / "build" / "bin")
    assert len(commands) == 3  # recorded for the JSON even when skipped
    # a stale stamp: configure and build run (here: recorded by the fake run), the stamp is rewritten
    (cache / "build" / "pocketllm.stamp").write_text("{}")
    info = vs.ensure_llamacpp(cache, 2, [])
    assert [c[0] for c in ran] == ["cmake", "nice"] and "-j2" in ran[1] and not info["reused"]
    assert (cache / "build" / "pocketllm.stamp").read_text() == vs.build_stamp()


def test_classify_bundle(vs):
    assert vs.classify_bundle({"quantization": {"scheme": "any4"}})["exact_any4"]
    assert not vs.classify_bundle({"quantization": {"scheme": "any4", "activations": "int8"}})["exact_any4"]
    assert not vs.classify_bundle({"quantization": {"scheme": "any4_w4a8"}})["exact_any4"]
    assert not vs.classify_bundle({"quantization": {"scheme": "8da4w"}})["exact_any4"]
    assert vs.classify_bundle({"quantization": {"scheme": "8da4w"}})["activations"] == "int8"
    assert vs.classify_bundle({})["scheme"] == "none"
    # manifests as pocketllm writes them: the W4A8 variant shares the any4 scheme
    w4a8 = vs.classify_bundle({"quantization": {"scheme": "any4", "variant": "any4-w4a8", "activations": "int8",
                                                "lm_head": "int8"}})
    assert not w4a8["exact_any4"] and w4a8["head_quantized"]
    exact = vs.classify_bundle({"quantization": {"scheme": "any4", "variant": "any4", "activations": "fp32",
                                                 "lm_head": "int8"}})
    assert exact["exact_any4"] and exact["head_quantized"]
    assert not vs.classify_bundle({"quantization": {"scheme": "any4", "lm_head": "fp32"}})["head_quantized"]


def variants(vs):
    def engine(decode, prefill, long_decode=None, **extra):
        v = {"decode": {t: {"tok_s": x} for t, x in decode.items()},
             "prefill": {t: {"tok_s": x} for t, x in prefill.items()}, "file_mib": 1.0, **extra}
        if long_decode:
            v["long"] = {"prefill": {t: {"tok_s": 10.0 * x} for t, x in long_decode.items()},
                         "decode": {t: {"tok_s": x} for t, x in long_decode.items()}}
        return v

    q4 = engine({"1": 40.0, "2": 70.0}, {"1": 100.0, "2": 200.0}, {"2": 10.0}, engine="llama.cpp")
    q4["prefill_all"] = q4["prefill"]
    q4["prefill_last"] = {"1": {"tok_s": 120.0}, "2": {"tok_s": 240.0}}
    return {
        vs.Q4_0: q4,
        vs.Q4_0_F32HEAD: engine({"1": 30.0, "2": 50.0}, {"1": 90.0, "2": 180.0}, engine="llama.cpp"),
        "any4": engine({"1": 20.0, "2": 35.0}, {"1": 50.0, "2": 100.0}, {"2": 35.0}, engine="executorch",
                       prefill_logits="all", **{"class": {"exact_any4": True}}),
        "fast": engine({"1": 50.0, "2": 84.0}, {"1": 120.0, "2": 240.0}, {"2": 40.0}, engine="executorch",
                       prefill_logits="last", **{"class": {"exact_any4": False}}),
    }


def test_compute_ratios(vs):
    top = vs.compute_ratios(variants(vs))
    assert top["best_decode_ratio_vs_q4_0"] == pytest.approx(1.2) and top["best_decode_variant"] == "fast"
    assert top["any4_exact_decode_ratio_vs_q4_0"] == pytest.approx(0.5) and top["any4_exact_variant"] == "any4"
    r = top["ratios"]
    assert r["decode"]["1"]["any4"] == pytest.approx(0.5)
    # prefill against llama.cpp with logits for the same positions: all -> prefill_all, last -> prefill_last
    assert r["prefill"]["2"]["any4"] == pytest.approx(0.5) and r["prefill"]["2"]["fast"] == pytest.approx(1.0)
    assert top["best_prefill_ratio_vs_q4_0"] == pytest.approx(1.0)
    assert r["long_decode"]["2"] == {"any4": pytest.approx(3.5), "fast": pytest.approx(4.0)}
    assert top["best_long_decode_ratio_vs_q4_0"] == pytest.approx(4.0)
    assert r["long_prefill"]["2"] == {"any4": pytest.approx(3.5), "fast": pytest.approx(4.0)}
    assert vs.Q4_0 not in r["decode"]["2"] and vs.Q4_0_F32HEAD not in r["decode"]["2"]
    json.dumps(top)  # plain JSON


def test_exact_any4_ratio_prefers_a_quantized_head(vs):
    v = variants(vs)
    v["any4"]["class"] = {"exact_any4": True, "head_quantized": False}
    fast_f32 = dict(v["any4"], decode={"2": {"tok_s": 60.0}}, **{"class": {"exact_any4": True}})
    slow_int8 = dict(v["any4"], decode={"2": {"tok_s": 42.0}},
                     **{"class": {"exact_any4": True, "head_quantized": True}})
    top = vs.compute_ratios({**v, "any4 f32 head": fast_f32, "any4 int8 head": slow_int8})
    assert top["any4_exact_variant"] == "any4 int8 head"
    assert top["any4_exact_decode_ratio_vs_q4_0"] == pytest.approx(0.6)
    # no exact bundle with a quantized head: the best exact one
    top = vs.compute_ratios({**v, "any4 f32 head": fast_f32})
    assert top["any4_exact_variant"] == "any4 f32 head"


def test_compute_ratios_without_exact_any4_or_reference(vs):
    v = variants(vs)
    del v["any4"]
    top = vs.compute_ratios(v)
    assert top["any4_exact_decode_ratio_vs_q4_0"] is None and top["any4_exact_variant"] is None
    top = vs.compute_ratios({"fast": v["fast"]})
    assert top["best_decode_ratio_vs_q4_0"] is None


def test_check_result(vs):
    v = variants(vs)
    result = {**vs.compute_ratios(v), "variants": v}
    for k in ("conversion", "rss", "machine", "versions", "commands", "settings", "method"):
        result[k] = {}
    assert vs.check_result(result) == []
    del result["any4_exact_decode_ratio_vs_q4_0"]
    del result["variants"]["fast"]["file_mib"]
    problems = vs.check_result(result)
    assert "missing key any4_exact_decode_ratio_vs_q4_0" in problems
    assert "variant fast: missing file_mib" in problems


def test_committed_result_has_the_shape(vs):
    path = SCRIPT.parent / "results" / "vs_llamacpp.json"
    if not path.exists():
        pytest.skip("no committed result yet")
    result = json.loads(path.read_text())
    assert vs.check_result(result) == []
    assert isinstance(result["best_decode_ratio_vs_q4_0"], float)
    assert isinstance(result["any4_exact_decode_ratio_vs_q4_0"], float)


def test_parse_args(vs):
    a = vs.parse_args(["--checkpoint", "ck", "--bundle", "any4=b/a", "--bundle", "w4a8=b/w"])
    assert a.threads == [1, 2] and a.long_threads == [2] and a.long_context == 16384
    assert a.bundles == {"any4": Path("b/a"), "w4a8": Path("b/w")}
    assert a.long_variants == [vs.Q4_0, "any4", "w4a8"]
    assert a.out == vs.REPO / "benchmarks" / "results" / "vs_llamacpp" and a.cache == vs.DEFAULT_CACHE
    assert a.prefill_tokens == 128 and a.rss_tokens == 64
    a = vs.parse_args(["--checkpoint", "ck", "--bundle", "w4a8=b/w", "--threads", "2", "--long-context", "0",
                       "--long-variants", "w4a8", "--decode-steps", "500"])
    assert a.threads == [2] and a.long_context == 0 and a.long_variants == [vs.Q4_0, "w4a8"]
    with pytest.raises(ValueError, match="cache holds"):
        vs.parse_args(["--checkpoint", "ck", "--decode-steps", "500"])


def test_main_rejects_bad_arguments(vs):
    with pytest.raises(SystemExit):
        vs.main(["--bundle", "x"])  # --checkpoint missing
    with pytest.raises(ValueError):
        vs.main(["--checkpoint", "c", "--bundle", "noequals", "--work", "/nonexistent/never"])


def test_parity_contract_per_variant(vs):
    assert vs.klass_exact({"scheme": "any4", "activations": "fp32"}) and vs.klass_exact({"scheme": "any4"})
    assert vs.klass_exact({}) and vs.klass_exact({"scheme": "int8"})
    assert not vs.klass_exact({"scheme": "any4", "activations": "int8"})
    assert not vs.klass_exact({"scheme": "8da4w", "activations": "int8 dynamic per token"})
