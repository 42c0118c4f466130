"""pocketllm never loses data: no command writes over, into or around its inputs; `--force` replaces only a bundle
or checkpoint pocketllm wrote (export/outputs.py); nothing beside OUT is written; result files follow the umask.
Each refusal is one line, exit code 2, and every byte of the inputs is unchanged (hashed before and after)."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest

from pocketllm.export.checkpoint import CHECKPOINT_MARK, open_checkpoint, read_safetensors_header
from tests.cli.conftest import assert_one_line_error, invoke, tree_hash

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def ckpt(tiny_copy):
    return tiny_copy("minicpm4_dense")


# ------------------------------------------------------------------ OUT is, contains or is inside an input
@pytest.mark.parametrize("where,fragment", [("same", "is the --checkpoint input itself"),
                                            ("inside", "is inside the --checkpoint input"),
                                            ("parent", "contains the --checkpoint input")])
@pytest.mark.parametrize("command", ["export", "quantize"])
def test_out_overlapping_the_checkpoint_is_refused_even_with_force(ckpt, command, where, fragment):
    out = {"same": ckpt, "inside": ckpt / "out", "parent": ckpt.parent}[where]
    before = tree_hash(ckpt.parent)
    extra = ["--quant", "int8"] if command == "export" else ["--scheme", "int8"]
    r = invoke(command, "--checkpoint", ckpt, "--out", out, "--force", *extra)
    assert_one_line_error(r, f"--out {out}", fragment)
    assert tree_hash(ckpt.parent) == before


def test_calibration_file_is_an_input(ckpt, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("Some calibration text for the quantizer, long enough to tokenize.\n")
    before = tree_hash(calib)
    r = invoke("quantize", "--checkpoint", ckpt, "--scheme", "int4", "--group-size", 32, "--calibration", calib,
               "--out", calib, "--force")
    assert_one_line_error(r, "is the --calibration input itself")
    assert tree_hash(calib) == before


def test_result_files_are_never_written_over_inputs(ckpt, tmp_path):
    before = tree_hash(ckpt)
    r = invoke("logits", "--checkpoint", ckpt, "--tokens", "1,2,3", "--out", ckpt / "config.json")
    assert_one_line_error(r, "--out", "is inside the --checkpoint input")
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged.\n")
    r = invoke("perplexity", "--checkpoint", ckpt, "--text", text, "--json", text)
    assert_one_line_error(r, "--json", "is the --text input itself")
    assert tree_hash(ckpt) == before and text.read_text() == "It is a truth universally acknowledged.\n"


# ------------------------------------------------------------------ --force replaces only what pocketllm wrote
def test_force_never_replaces_a_plain_file(tmp_path):
    target = tmp_path / "afile.txt"
    target.write_text("my notes")
    r = invoke("init-checkpoint", "--arch", "minicpm4", "--preset", "tiny", "--out", target, "--force")
    assert_one_line_error(r, f"--out {target} is a file", "even with --force")
    assert target.read_text() == "my notes"


def test_force_never_replaces_a_folder_of_the_users(tmp_path):
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "thesis.tex").write_text("\\documentclass{article}")
    before = tree_hash(folder)
    r = invoke("init-checkpoint", "--arch", "minicpm4", "--preset", "tiny", "--out", folder, "--force")
    assert_one_line_error(r, "was not written by pocketllm", "--force replaces only those")
    assert tree_hash(folder) == before


def test_force_never_replaces_a_checkpoint_pocketllm_did_not_write(tmp_path):
    """models/tiny-austen-like: a valid checkpoint, but its shards lack pocketllm's mark (e.g. from the Hub)."""
    from safetensors.numpy import load_file, save_file

    from tests.conftest import TINY_AUSTEN

    hub = tmp_path / "hub"
    shutil.copytree(TINY_AUSTEN, hub, ignore=shutil.ignore_patterns("eval", "*.md", "train_log.json"))
    tensors = load_file(str(hub / "model.safetensors"))
    save_file(tensors, str(hub / "model.safetensors"), metadata={"format": "pt"})
    open_checkpoint(hub)  # valid
    before = tree_hash(hub)
    r = invoke("init-checkpoint", "--arch", "minicpm4", "--preset", "tiny", "--out", hub, "--force")
    assert_one_line_error(r, "was not written by pocketllm")
    assert tree_hash(hub) == before


def test_force_replaces_a_checkpoint_pocketllm_wrote_but_not_a_file_added_to_it(tmp_path):
    out = tmp_path / "ck"
    assert invoke("init-checkpoint", "--arch", "minicpm4", "--preset", "tiny", "--out", out).exit_code == 0
    header = read_safetensors_header(out / "model.safetensors")
    assert header["__metadata__"] == {"format": "pt", **CHECKPOINT_MARK}
    r = invoke("init-checkpoint", "--arch", "minicpm4", "--preset", "tiny", "--out", out)
    assert_one_line_error(r, "already exists", "a checkpoint pocketllm wrote: pass --force")
    (out / "notes.txt").write_text("mine")
    before = tree_hash(out)
    r = invoke("init-checkpoint", "--arch", "minicpm4", "--preset", "tiny", "--out", out, "--force")
    assert_one_line_error(r, "also holds notes.txt", "move them")
    assert tree_hash(out) == before
    (out / "notes.txt").unlink()
    r = invoke("init-checkpoint", "--arch", "smallthinker", "--preset", "tiny", "--out", out, "--force")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["model_type"] == "smallthinker"
    assert not [p for p in tmp_path.iterdir() if p.name != "ck"]  # no temporary or old copy left beside it


def test_force_replaces_a_bundle_pocketllm_wrote_but_not_one_with_a_file_added(bundle_copy):
    (bundle_copy / "my-notes.md").write_text("mine")
    before = tree_hash(bundle_copy)
    r = invoke("init-checkpoint", "--arch", "minicpm4", "--preset", "tiny", "--out", bundle_copy, "--force")
    assert_one_line_error(r, "a bundle pocketllm wrote", "my-notes.md")
    assert tree_hash(bundle_copy) == before
    (bundle_copy / "my-notes.md").unlink()
    r = invoke("init-checkpoint", "--arch", "minicpm4", "--preset", "tiny", "--out", bundle_copy, "--force")
    assert r.exit_code == 0, r.output
    assert not (bundle_copy / "manifest.json").exists() and (bundle_copy / "config.json").is_file()


# ------------------------------------------------------------------ nothing beside OUT
def test_export_quant_writes_nothing_beside_out(nf4_bundle):
    """--quant puts the quantized weights into OUT/reference: an unrelated `OUT.nf4-checkpoint` beside the bundle
    (what export used to replace) is untouched, and no other entry appears beside OUT."""
    ckpt, bundle, _ = nf4_bundle
    sibling = bundle.parent / "bundle.nf4-checkpoint"
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["bundle", "bundle.nf4-checkpoint", "ckpt"]
    assert (sibling / "notes.txt").read_text() == "not pocketllm's"
    reference = json.loads((bundle / "reference" / "config.json").read_text())
    assert reference["quantization_config"]["scheme"] == "nf4"


# ------------------------------------------------------------------ permissions follow the umask
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_result_files_follow_the_umask(tmp_path, ckpt, umask, mode):
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged, that a single man.\n")
    old = os.umask(umask)
    try:
        r1 = invoke("logits", "--checkpoint", ckpt, "--tokens", "1,2,3", "--out", tmp_path / "l.npy")
        r2 = invoke("perplexity", "--checkpoint", ckpt, "--text", text, "--context", 16, "--json",
                    tmp_path / "p.json")
    finally:
        os.umask(old)
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    for name in ("l.npy", "p.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
