"""export/bundle/chat.py: prefix/suffix chat strings derived from Jinja templates reproduce transformers' own
rendering (apply_chat_template's render_jinja_template, the independent oracle) byte for byte; templates that are
not of that form are refused with one line saying why."""

from __future__ import annotations

import pytest

from pocketllm.export.bundle.chat import (VERIFY_CONVERSATIONS, VERIFY_SYSTEM, ChatFormat, chat_for_manifest, derive_chat,
                                render_chat, render_template, special_tokens_of, template_from_config, verify_chat)
from pocketllm.export.errors import PocketllmError
from tests.bundle.chat_templates import CHATML_DEFAULT_SYSTEM, DECOMPOSABLE, LLAMA3

# Beyond VERIFY_CONVERSATIONS (what derive_chat checks itself): turns with markup-like and empty-looking text.
MORE_CONVERSATIONS = [
    [{"role": "user", "content": "<|im_start|>user is just text here"}, {"role": "assistant", "content": "OK"},
     {"role": "user", "content": "Line one\n\nLine three\ttabbed"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"}, {"role": "assistant", "content": "f"},
     {"role": "user", "content": "g"}],
]


def transformers_render(template: str, messages, bos: str, eos: str) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template, add_generation_prompt=True,
                                        bos_token=bos, eos_token=eos)
    return rendered[0]


def test_chatml_strings():
    template, bos, eos = DECOMPOSABLE["chatml"]
    chat = derive_chat(template, bos_token=bos, eos_token=eos, eos_ids=[2, 73440],
                       special_tokens={2: "</s>", 73440: "<|im_end|>"})
    assert chat.to_manifest() == {
        "roles": {"system": {"prefix": "<|im_start|>system\n", "suffix": "<|im_end|>\n"},
                  "user": {"prefix": "<|im_start|>user\n", "suffix": "<|im_end|>\n"},
                  "assistant": {"prefix": "<|im_start|>assistant\n", "suffix": "<|im_end|>\n"}},
        "generation_prefix": "<|im_start|>assistant\n",
        "stop_ids": [73440],  # the end-of-turn token, not </s>
    }
    assert chat.leading_text == ""


@pytest.mark.parametrize("name", sorted(DECOMPOSABLE))
def test_derived_strings_reproduce_transformers(name):
    template, bos, eos = DECOMPOSABLE[name]
    chat = derive_chat(template, bos_token=bos, eos_token=eos)
    conversations = [list(c) for c in VERIFY_CONVERSATIONS + MORE_CONVERSATIONS]
    if "system" in chat.roles:
        conversations += [[VERIFY_SYSTEM, *c] for c in conversations]
    for conv in conversations:
        oracle = transformers_render(template, conv, bos, eos)
        assert render_template(template, conv, add_generation_prompt=True, bos_token=bos, eos_token=eos) == oracle
        assert chat.leading_text + render_chat(conv, chat) == oracle


def test_leading_bos_is_left_to_the_runtime():
    chat = derive_chat(LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    assert chat.leading_text == "<|begin_of_text|>"
    assert chat.roles["user"] == ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>")
    assert chat.generation_prefix == "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert "<|begin_of_text|>" not in str(chat.to_manifest())


@pytest.mark.parametrize("name", ["gemma", "mistral", "llama2"])
def test_templates_without_a_system_turn_have_no_system_role(name):
    template, bos, eos = DECOMPOSABLE[name]
    chat = derive_chat(template, bos_token=bos, eos_token=eos)
    assert set(chat.roles) == {"user", "assistant"}
    with pytest.raises(PocketllmError, match="no 'system' role"):
        render_chat([{"role": "system", "content": "x"}], chat)


def test_phi3_end_of_conversation_eos_is_not_part_of_the_user_suffix():
    template, bos, eos = DECOMPOSABLE["phi3"]  # renders eos_token after the last message when no reply is asked
    chat = derive_chat(template, bos_token=bos, eos_token=eos)
    assert chat.roles["user"] == ("<|user|>\n", "<|end|>\n")
    assert chat.generation_prefix == "<|assistant|>\n"


def test_a_default_system_prompt_is_refused():
    with pytest.raises(PocketllmError, match="default system prompt") as e:
        derive_chat(CHATML_DEFAULT_SYSTEM, eos_token="<|im_end|>")
    assert "\n" not in str(e.value).replace("\\n", "")


def test_position_dependent_turns_are_refused():
    template = ("{% for m in messages %}{% if loop.last %}<last>{% endif %}<{{ m['role'] }}>{{ m['content'] }}"
                "</{{ m['role'] }}>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    with pytest.raises(PocketllmError, match="not prefix/suffix-decomposable"):
        derive_chat(template)


def test_a_template_that_drops_content_is_refused():
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}U: {{ m['content'] }}\n{% else %}A: ...\n"
                "{% endif %}{% endfor %}{% if add_generation_prompt %}A:{% endif %}")
    with pytest.raises(PocketllmError, match="content exactly once"):
        derive_chat(template)


def test_a_template_that_transforms_content_fails_verification():
    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | replace('\\n', ' ') }}</s>{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    with pytest.raises(PocketllmError, match="conversation 1 .* renders"):
        derive_chat(template)  # the sentinels have no newline; the second verification conversation does


def test_a_template_that_refuses_plain_conversations():
    template = "{{ raise_exception('a system message is required') }}"
    with pytest.raises(PocketllmError, match="refuses a plain user/assistant conversation: a system message"):
        derive_chat(template)


def test_syntax_error_is_one_line():
    with pytest.raises(PocketllmError, match="Jinja syntax error on line 1"):
        derive_chat("{% for m in messages %}")


def test_verify_chat_catches_a_wrong_format():
    template, bos, eos = DECOMPOSABLE["chatml"]
    wrong = ChatFormat({"user": ("<|im_start|>user\n", "<|im_end|>"), "assistant": ("<|im_start|>assistant\n",
                                                                                     "<|im_end|>\n")},
                       "<|im_start|>assistant\n")
    with pytest.raises(PocketllmError, match="at offset"):
        verify_chat(template, wrong, bos_token=bos, eos_token=eos)


def test_stop_ids_fall_back_to_all_eos_ids():
    template, bos, eos = DECOMPOSABLE["chatml"]
    chat = derive_chat(template, bos_token=bos, eos_token=eos, eos_ids=[2], special_tokens={2: "</s>"})
    assert chat.stop_ids == [2]  # </s> is not in "<|im_end|>\n": the model's EOS still ends the turn


def test_template_from_config():
    assert template_from_config({"chat_template": "T"}) == "T"
    assert template_from_config({"chat_template": [{"name": "tool_use", "template": "X"},
                                                   {"name": "default", "template": "D"}]}) == "D"
    assert template_from_config({}) is None
    assert template_from_config({"chat_template": ""}) is None


def test_chat_for_a_checkpoints_tokenizer_files(tmp_path):
    """What the exporter records: tiny-austen (MiniCPM4 ChatML; EOS ids </s> and <|im_end|>)."""
    import json
    import shutil

    from tests.conftest import TINY_AUSTEN

    eos = json.loads((TINY_AUSTEN / "config.json").read_text())["eos_token_id"]
    assert [special_tokens_of(TINY_AUSTEN)[i] for i in eos] == ["</s>", "<|im_end|>"]
    template, chat = chat_for_manifest(TINY_AUSTEN, eos)
    assert template == json.loads((TINY_AUSTEN / "tokenizer_config.json").read_text())["chat_template"]
    assert chat["roles"]["assistant"] == {"prefix": "<|im_start|>assistant\n", "suffix": "<|im_end|>\n"}
    assert chat["stop_ids"] == [eos[1]]  # <|im_end|> ends a turn; </s> ends a document
    assert chat_for_manifest(tmp_path, eos) == (None, None)  # no tokenizer_config.json: no chat format

    broken = tmp_path / "ckpt"
    shutil.copytree(TINY_AUSTEN, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((broken / "tokenizer_config.json").read_text())
    (broken / "tokenizer_config.json").write_text(json.dumps(dict(cfg, chat_template=CHATML_DEFAULT_SYSTEM)))
    with pytest.raises(PocketllmError, match="tokenizer_config.json: chat template is not prefix/suffix"):
        chat_for_manifest(broken, eos)
