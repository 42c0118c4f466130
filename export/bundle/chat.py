"""Chat formatting apps can do without Jinja: per-role prefix/suffix strings derived from the checkpoint's template.

A checkpoint's `tokenizer_config.json` carries a Jinja `chat_template`; transformers renders it with `messages`,
`add_generation_prompt`, `bos_token`, `eos_token` (`apply_chat_template`). Phones have no Jinja, so the exporter
records in `manifest.json` the form most templates reduce to:

    rendering = prefix[role_1] + content_1 + suffix[role_1] + ... + prefix[role_n] + content_n + suffix[role_n]
                + generation_prefix                                            (when asking for a reply)

`derive_chat` finds these strings by rendering conversations whose contents are sentinels and cutting the text
between them, then checks (`verify_chat`) that the derived form reproduces the Jinja rendering byte for byte on
multi-turn conversations, with and without a system message. Templates that are not of this form (a default system
prompt inserted when none is given, a system message merged into the first user turn, turns rendered differently
by position or date) raise a PocketllmError naming the first difference.

The one text a template may put before the first message is the BOS token (Llama 3, Gemma, Mistral): it is left out
of the recorded strings (`ChatFormat.leading_text`), because runtimes prepend BOS as a token (manifest
`tokenizer.num_bos`), not as text.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from pocketllm.export.errors import PocketllmError

ROLES = ("system", "user", "assistant")


# --- Rendering the Jinja template the way transformers' apply_chat_template does ---------------------------------

@functools.lru_cache(maxsize=16)
def _compile(template: str):
    """transformers' environment: sandboxed, trim_blocks + lstrip_blocks, loop controls, its `tojson` (no HTML
    escaping, ensure_ascii=False), `raise_exception` and `strftime_now` globals."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise PocketllmError(f"chat_template: Jinja syntax error on line {e.lineno}: {e.message}") from None


def render_template(template: str, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool,
                    bos_token: str = "", eos_token: str = "", **special_tokens: str) -> str:
    """Render `template` as transformers' apply_chat_template(tokenize=False) does. Raises jinja2's TemplateError
    when the template itself refuses the conversation (raise_exception)."""
    return _compile(template).render(messages=[dict(m) for m in messages], tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, bos_token=bos_token,
                                     eos_token=eos_token, **special_tokens)


def template_from_config(tokenizer_config: Mapping[str, Any]) -> str | None:
    """The `chat_template` of a tokenizer_config.json: a string, or a list of named templates (the "default" one)."""
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def token_text(value: Any) -> str:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


# --- The prefix/suffix form -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChatFormat:
    """roles: role -> (prefix, suffix); "system" is absent when the template has no separate system turn.
    leading_text: what the template renders before the first message (the BOS token, or "")."""

    roles: dict[str, tuple[str, str]]
    generation_prefix: str
    stop_ids: list[int] = field(default_factory=list)
    leading_text: str = ""

    def to_manifest(self) -> dict[str, Any]:
        """The manifest's `chat` object (schema: export/bundle/manifest.schema.json)."""
        return {"roles": {role: {"prefix": p, "suffix": s} for role, (p, s) in self.roles.items()},
                "generation_prefix": self.generation_prefix, "stop_ids": list(self.stop_ids)}


def render_chat(messages: Iterable[Mapping[str, str]], chat: Mapping[str, Any] | ChatFormat,
                add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages` from a manifest `chat` object (what the apps do, in Python)."""
    if isinstance(chat, ChatFormat):
        chat = chat.to_manifest()
    parts = []
    for i, m in enumerate(messages):
        role = chat["roles"].get(m["role"])
        if role is None:
            raise PocketllmError(f"chat format has no {m['role']!r} role (message {i}; roles: "
                                 f"{', '.join(chat['roles'])})")
        parts += [role["prefix"], m["content"], role["suffix"]]
    if add_generation_prompt:
        parts.append(chat["generation_prefix"])
    return "".join(parts)


def _sentinel(i: int) -> str:
    return f"PLMSENTINEL{i}X"  # ASCII letters and digits only: survives `| trim`, escaping and case-preserving filters


def _split(rendered: str, contents: Sequence[str], what: str) -> list[str]:
    """The texts around each content, in order: [before c0, between c0 and c1, ..., after c_last]."""
    pieces, pos = [], 0
    for c in contents:
        i = rendered.find(c, pos)
        if i < 0 or rendered.count(c) != 1:
            raise PocketllmError(f"chat template is not prefix/suffix-decomposable: {what} does not render each "
                                 "message's content exactly once, in order")
        pieces.append(rendered[pos:i])
        pos = i + len(c)
    pieces.append(rendered[pos:])
    return pieces


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def derive_chat(template: str, *, bos_token: str = "", eos_token: str = "", eos_ids: Sequence[int] = (),
                special_tokens: Mapping[int, str] | None = None, verify: bool = True) -> ChatFormat:
    """Per-role prefix/suffix strings and the generation prefix of `template`, verified byte for byte
    (`verify_chat`). stop_ids: the ids in `eos_ids` whose token text (`special_tokens`: id -> text) occurs in the
    assistant suffix (the end-of-turn token), else all of `eos_ids`."""
    import jinja2

    def render(messages, gen):
        return render_template(template, messages, add_generation_prompt=gen, bos_token=bos_token,
                               eos_token=eos_token)

    s = [_sentinel(i) for i in range(8)]
    user = lambda i: {"role": "user", "content": s[i]}  # noqa: E731
    assistant = lambda i: {"role": "assistant", "content": s[i]}  # noqa: E731
    probe = [user(0), assistant(1), user(2), assistant(3), user(4)]
    try:
        t = _split(render(probe, True), s[:5], "a user/assistant conversation")
    except jinja2.exceptions.TemplateError as e:
        raise PocketllmError(f"chat template refuses a plain user/assistant conversation: {e}") from None
    # t = [lead + p_user, s_user + p_asst, s_asst + p_user, s_user + p_asst, s_asst + p_user, s_user + generation]
    if t[1] != t[3] or t[2] != t[4]:
        raise PocketllmError("chat template is not prefix/suffix-decomposable: the same turn renders differently "
                             f"depending on its position ({t[1]!r} vs {t[3]!r}, {t[2]!r} vs {t[4]!r})")
    lead = bos_token if bos_token and t[0].startswith(bos_token) else ""
    p_user = t[0][len(lead):]
    if not t[2].endswith(p_user):
        raise PocketllmError("chat template is not prefix/suffix-decomposable: the first user turn starts with "
                             f"{p_user!r} but later ones with the end of {t[2]!r} (text added before the first "
                             "message only, such as a default system prompt)")
    s_asst = t[2][:len(t[2]) - len(p_user)]
    s_user = _user_suffix(render, lead, p_user, s_asst, t, s)
    roles = {"user": (p_user, s_user), "assistant": (t[1][len(s_user):], s_asst)}
    system = _system_role(render, lead, p_user, t, s)
    if system is not None:
        roles = {"system": system, **roles}
    chat = ChatFormat(roles, t[5][len(s_user):], _stop_ids(s_asst, eos_ids, special_tokens or {}), lead)
    if verify:
        verify_chat(template, chat, bos_token=bos_token, eos_token=eos_token)
    return chat


def _user_suffix(render, lead, p_user, s_asst, t, s) -> str:
    """Where the user suffix ends and the assistant prefix (or generation prefix) begins. Both only ever appear
    together after a user turn, so any split reproduces the renderings; the natural one is what the template
    renders after a lone user message when no reply is asked for, less what it renders after any conversation's
    end (e.g. an EOS token: the same tail after an assistant turn, beyond the assistant suffix)."""
    import jinja2

    fallback = _common_prefix(t[1], t[5])
    try:
        after_user = render([{"role": "user", "content": s[0]}], False)
        after_asst = render([{"role": "user", "content": s[0]}, {"role": "assistant", "content": s[1]}], False)
    except jinja2.exceptions.TemplateError:
        return fallback
    head = lead + p_user + s[0]
    if not after_user.startswith(head) or not after_asst.startswith(head + t[1] + s[1]):
        return fallback
    tail_user, tail_asst = after_user[len(head):], after_asst[len(head + t[1] + s[1]):]
    if not tail_asst.startswith(s_asst):
        return fallback
    end = tail_asst[len(s_asst):]  # rendered after the last message of any conversation
    if not tail_user.endswith(end):
        return fallback
    candidate = tail_user[:len(tail_user) - len(end)]
    return candidate if t[1].startswith(candidate) and t[5].startswith(candidate) else fallback


def _system_role(render, lead, p_user, t, s) -> tuple[str, str] | None:
    """(prefix, suffix) of a system turn, or None when the template refuses a system message or does not render it
    as a turn of its own (e.g. merged into the first user turn)."""
    import jinja2

    conv = [{"role": "system", "content": s[7]}, {"role": "user", "content": s[0]},
            {"role": "assistant", "content": s[1]}, {"role": "user", "content": s[2]}]
    try:
        q = _split(render(conv, True), [s[7], s[0], s[1], s[2]], "a conversation with a system message")
    except (jinja2.exceptions.TemplateError, PocketllmError):
        return None
    # q = [lead + p_sys, s_sys + p_user, s_user + p_asst, s_asst + p_user, s_user + generation]
    if not q[0].startswith(lead) or not q[1].endswith(p_user) or q[2:] != [t[1], t[2], t[5]]:
        return None
    return q[0][len(lead):], q[1][:len(q[1]) - len(p_user)]


def _stop_ids(assistant_suffix: str, eos_ids: Sequence[int], special_tokens: Mapping[int, str]) -> list[int]:
    ids = [i for i in eos_ids if special_tokens.get(i) and special_tokens[i] in assistant_suffix]
    return ids or list(eos_ids)


# Conversations the derived form must reproduce: several turns, multi-line and non-ASCII text, text that looks like
# Jinja or markup. Contents carry no surrounding whitespace (some templates `| trim`; apps trim input likewise).
VERIFY_CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And 3 + 3?\nAnswer in one word."}],
    [{"role": "user", "content": "Write a haiku about the sea."},
     {"role": "assistant",
      "content": "Grey waves fold on stone,\nsalt wind carries gull voices;\nthe tide keeps its time."},
     {"role": "user", "content": "Now one about mountains, please."},
     {"role": "assistant", "content": "Snow holds the high pass;\n{{ not a variable }} {% raw %} <b>bold</b>"},
     {"role": "user", "content": "Grüße aus Köln — 你好，世界 🙂"}],
]
VERIFY_SYSTEM = {"role": "system", "content": "You are a concise assistant.\nAnswer in English."}


def verify_chat(template: str, chat: ChatFormat | Mapping[str, Any], *, bos_token: str = "", eos_token: str = "",
                conversations: Sequence[Sequence[Mapping[str, str]]] | None = None) -> None:
    """Raise a PocketllmError unless render_chat reproduces the Jinja rendering (leading BOS text aside) of every
    conversation, each with and without a system message when the format has a system role."""
    fmt = chat if isinstance(chat, ChatFormat) else None
    manifest_chat = chat.to_manifest() if fmt else chat
    lead = fmt.leading_text if fmt else ""
    convs = [list(c) for c in (conversations or VERIFY_CONVERSATIONS)]
    if "system" in manifest_chat["roles"]:
        convs += [[VERIFY_SYSTEM, *c] for c in convs]
    for k, conv in enumerate(convs):
        expected = render_template(template, conv, add_generation_prompt=True, bos_token=bos_token,
                                   eos_token=eos_token)
        if lead and expected.startswith(lead):
            expected = expected[len(lead):]
        derived = render_chat(conv, manifest_chat)
        if derived != expected:
            i = len(_common_prefix(derived, expected))
            raise PocketllmError(
                f"chat template is not prefix/suffix-decomposable: conversation {k} ({len(conv)} messages) renders "
                f"{expected[max(0, i - 20):i + 40]!r} at offset {i} but the prefix/suffix form gives "
                f"{derived[max(0, i - 20):i + 40]!r}")


def special_tokens_of(tokenizer_dir: Path) -> dict[int, str]:
    """id -> text of the added/special tokens a checkpoint declares: tokenizer.json `added_tokens`, else
    tokenizer_config.json `added_tokens_decoder` (SentencePiece checkpoints), else added_tokens.json."""
    d = Path(tokenizer_dir)
    out: dict[int, str] = {}
    try:
        if (d / "tokenizer.json").is_file():
            for t in json.loads((d / "tokenizer.json").read_text()).get("added_tokens", []):
                out[int(t["id"])] = t["content"]
        if (d / "tokenizer_config.json").is_file():
            for i, t in json.loads((d / "tokenizer_config.json").read_text()).get("added_tokens_decoder", {}).items():
                out.setdefault(int(i), token_text(t))
        if (d / "added_tokens.json").is_file():
            for text, i in json.loads((d / "added_tokens.json").read_text()).items():
                out.setdefault(int(i), text)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise PocketllmError(f"{d}: unreadable tokenizer files ({e.__class__.__name__}: {e})") from None
    return out


def chat_for_manifest(tokenizer_dir: Path, eos_ids: Sequence[int]) -> tuple[str | None, dict[str, Any] | None]:
    """(tokenizer.chat_template, chat) for a bundle's manifest from the checkpoint's tokenizer files: the Jinja
    template as shipped and its verified prefix/suffix form; (None, None) when the checkpoint has no template.
    Raises a PocketllmError when the template is not prefix/suffix-decomposable. (The leading BOS text some templates
    start with is dropped: check `derive_chat(...).leading_text` against the manifest's num_bos if it matters.)"""
    path = Path(tokenizer_dir) / "tokenizer_config.json"
    if not path.is_file():
        return None, None
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PocketllmError(f"{path}: not valid JSON ({e})") from None
    template = template_from_config(cfg)
    if template is None:
        return None, None
    try:
        chat = derive_chat(template, bos_token=token_text(cfg.get("bos_token")),
                           eos_token=token_text(cfg.get("eos_token")), eos_ids=eos_ids,
                           special_tokens=special_tokens_of(tokenizer_dir))
    except PocketllmError as e:
        raise PocketllmError(f"{path}: {e}") from None
    return template, chat.to_manifest()
