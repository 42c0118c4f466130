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


def test_classify_bundle(vs):
    assert vs.classify_bundle({"quantization": {"scheme": "any4"}})["exact_any4"]
    assert not vs.classify_bundle({"quantization": {"scheme": "any4", "activations": "int8"}})["exact_any4"]
    assert not vs.classify_bundle({"quantization": {"scheme": "any4_w4a8"}})["exact_any4"]
    assert not vs.classify_bundle({"quantization": {"scheme": "8da4w"}})["exact_any4"]
    assert vs.classify_bundle({"quantization": {"scheme": "8da4w"}})["activations"] == "int8"
    assert vs.classify_bundle({})["scheme"] == "none"


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


def test_main_rejects_bad_arguments(vs):
    with pytest.raises(SystemExit):
        vs.main(["--bundle", "x"])  # --checkpoint missing
    with pytest.raises(ValueError):
        vs.main(["--checkpoint", "c", "--bundle", "noequals", "--work", "/nonexistent/never"])
