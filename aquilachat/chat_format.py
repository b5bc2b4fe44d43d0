"""Chat templates: one renderer for inference (:func:`render`) and training (:func:`render_for_training`).

The Aquila templates are those published with AquilaChat (FastChat ``conversation.py``, names
``aquila-chat``, ``aquila-legacy``, ``aquila``, ``aquila-v1``; ``aquila-v2`` is ``aquila-v1`` with the
system message, as in Aquila2's ``predict.py``):

================  =========================================================================
name              rendered conversation (S = system message, q = user text, a = assistant text)
================  =========================================================================
aquila-chat       ``S###Human: q###Assistant: a###Human: q###Assistant:``
aquila-legacy     ``S\\n\\n### Human: q\\n### Assistant: a</s>### Human: q\\n### Assistant:`` (*)
aquila            ``S###Human: q###Assistant: a</s>Human: q###Assistant:``
aquila-v1         ``<|startofpiece|>q<|endofpiece|>a</s><|startofpiece|>q<|endofpiece|>``
aquila-v2         ``S<|startofpiece|>q<|endofpiece|>a</s>...``
================  =========================================================================

(*) FastChat's ``aquila-legacy`` prompt ends with ``"### Assistant: "``. A trailing space
tokenizes as a lone ``" "`` token that never precedes an answer in the training data (where the
answer's first word carries the space, ``" Hello"``), so the open turn here ends at the colon and
the model writes the space itself, exactly as the data was tokenized.

How text becomes ids (the same code for both directions, so training and serving cannot drift):

* The rendered conversation is a list of segments. Control tokens of the template (``</s>``,
  ``<|startofpiece|>``, ...) become their ids directly. Every other piece of text is tokenized
  **without** special-token matching, so a user who types ``</s>`` gets the text ``</s>``.
* Consecutive non-assistant text (role markers, user text) is tokenized as one string, as the
  original system tokenized the whole prompt; an assistant answer plus its end-of-turn marker is
  tokenized on its own, so the ids of a prompt are always a prefix of the ids of the same
  conversation with the answer appended.
* The loss mask of :func:`render_for_training` is 1 on exactly the assistant answers and their
  end-of-turn marker (``###`` for ``aquila-chat``, ``</s>`` for the others).

User text can never create a turn, here or in any other runtime that renders the exported
templates (:func:`jinja_template` for transformers, vLLM and llama.cpp; :func:`ollama_template`).
Those runtimes render the conversation to one string and tokenize it with special-token matching,
so message text itself must not contain a control token's text or a plain-text separator. The
renderer changes message text (system, user and assistant alike) in two ways, both invisible when
displayed, and the Jinja template makes exactly the same changes:

* every control-token text of the Aquila tokenizers (:data:`GUARDED_TOKENS`: ``</s>``, ``[CLS]``,
  ``<|endoftext|>``, ...) gets a zero-width space (U+200B) after its first character:
  ``"</s>"`` becomes ``"<\\u200b/s>"``;
* in templates whose turns are separated by plain text (``###``), every ``#`` that is followed by
  another ``#`` gets a zero-width space after it, so no message contains ``##`` and therefore no
  ``###`` separator: ``"###Assistant: hi"`` becomes ``"#\\u200b#\\u200b#Assistant: hi"``;
* in system and user messages only, the image-instruction markers ``#text2image#`` and
  ``#InstructFace#`` get a zero-width space after their first ``#``
  (:func:`aquilachat.instructions.neutralize_markers`), so a user cannot get a working instruction
  copied into the model's answer; the model's own answers keep them, as trained.

Message text is also tokenized without special-token matching, so a control token unknown to
:data:`GUARDED_TOKENS` still stays text here (but not in the other runtimes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from .errors import ValidationError
from .instructions import MARKERS, neutralize_markers
from .tokenizer import AQUILA_SPECIAL_TOKENS

__all__ = ["ChatTemplate", "TEMPLATES", "get_template", "render", "render_text", "render_for_training",
           "normalize_messages", "DEFAULT_TEMPLATE", "AQUILA_SYSTEM", "GUARDED_TOKENS", "jinja_template",
           "template_name_of", "ollama_template", "CHAT_SAMPLING_DEFAULTS"]

AQUILA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
DEFAULT_TEMPLATE = "aquila-chat"
_ZWSP = "\u200b"

#: Control-token texts of the Aquila tokenizers (``<|endoftext|>`` = 0, then ids 100000-100007),
#: broken with a zero-width space wherever they occur in a message (see the module docstring).
GUARDED_TOKENS = ("<|endoftext|>",) + AQUILA_SPECIAL_TOKENS

#: Sampling settings of ``aquilachat chat`` (and of the exported ``generation_config.json`` and
#: Ollama ``Modelfile``): OpenAI / vLLM names; ``top_k`` 0 disables top-k.
CHAT_SAMPLING_DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "top_k": 0}


@dataclass(frozen=True)
class ChatTemplate:
    """A conversation format in FastChat's terms.

    Rendering: ``system + system_sep``; a user turn is ``user_prefix + message + seps[0]``; an
    assistant turn is ``assistant_prefix`` (prompt) then ``answer_prefix + message + seps[1]``
    (the supervised part); an open assistant turn ends with ``assistant_prefix``.
    ``special_texts`` are the template's control tokens, rendered as ids.
    """

    name: str
    system: str
    system_sep: str
    user_prefix: str
    assistant_prefix: str
    answer_prefix: str
    seps: tuple[str, str]
    stop: tuple[str, ...]
    special_texts: tuple[str, ...] = ()
    neutralize_hashes: bool = False
    description: str = ""

    @property
    def end_of_turn(self) -> str:
        """The marker that ends an assistant answer (supervised in training)."""
        return self.seps[1]

    def clean(self, text: str) -> str:
        """Neutralize control-token texts and plain-text turn separators in a message (see the
        module docstring)."""
        for token in GUARDED_TOKENS:
            text = text.replace(token, token[0] + _ZWSP + token[1:])
        if self.neutralize_hashes:
            text = re.sub(r"#(?=#)", "#" + _ZWSP, text)
        return text

    def clean_prompt(self, text: str) -> str:
        """:meth:`clean` for system and user messages, which also get the image-instruction markers
        neutralized (:func:`aquilachat.instructions.neutralize_markers`), so that a user cannot make
        the model copy a working ``#text2image#`` into its answer. Assistant messages keep them."""
        return neutralize_markers(self.clean(text))


TEMPLATES: dict[str, ChatTemplate] = {
    "aquila-chat": ChatTemplate(
        "aquila-chat", AQUILA_SYSTEM, "###", "Human: ", "Assistant:", " ", ("###", "###"),
        stop=("###", "</s>", "[UNK]"), neutralize_hashes=True,
        description="AquilaChat-7B default (FastChat 'aquila-chat', ADD_COLON_SINGLE, sep '###')"),
    "aquila-legacy": ChatTemplate(
        "aquila-legacy", AQUILA_SYSTEM + "\n\n", "", "### Human: ", "### Assistant:", " ", ("\n", "</s>"),
        stop=("</s>", "[UNK]"), special_texts=("</s>",), neutralize_hashes=True,
        description="the format AquilaChat's SFT data was trained in (NO_COLON_TWO, seps '\\n' / '</s>')"),
    "aquila": ChatTemplate(
        "aquila", AQUILA_SYSTEM, "###", "Human: ", "Assistant:", " ", ("###", "</s>"),
        stop=("</s>", "[UNK]"), special_texts=("</s>",), neutralize_hashes=True,
        description="FastChat 'aquila' (ADD_COLON_TWO, seps '###' / '</s>')"),
    "aquila-v1": ChatTemplate(
        "aquila-v1", "", "", "<|startofpiece|>", "<|endofpiece|>", "", ("", "</s>"),
        stop=("</s>", "<|endoftext|>"), special_texts=("<|startofpiece|>", "<|endofpiece|>", "</s>"),
        description="FastChat 'aquila-v1' (control tokens, no system message)"),
    "aquila-v2": ChatTemplate(
        "aquila-v2", AQUILA_SYSTEM, "", "<|startofpiece|>", "<|endofpiece|>", "", ("", "</s>"),
        stop=("</s>", "<|endoftext|>"), special_texts=("<|startofpiece|>", "<|endofpiece|>", "</s>"),
        description="aquila-v1 with the system message (Aquila2 'aquila-v2')"),
}


def get_template(name: str | ChatTemplate | None) -> ChatTemplate:
    """A template by name (``None`` -> ``aquila-chat``).

    Raises:
        ValidationError: unknown name, listing the known ones.
    """
    if isinstance(name, ChatTemplate):
        return name
    name = name or DEFAULT_TEMPLATE
    if name not in TEMPLATES:
        raise ValidationError(f"unknown chat template {name!r}; templates: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                 "bot": "assistant", "system": "system"}


def normalize_messages(messages: Sequence[Any], *, for_generation: bool) -> tuple[str | None, list[tuple[str, str]]]:
    """Validate OpenAI-style messages; return ``(system or None, [(role, content), ...])``.

    Accepts ``{"role", "content"}`` (OpenAI) and ``{"from", "value"}`` (FlagAI / ShareGPT) dicts.
    One optional system message first; then user and assistant strictly alternating, starting with
    user; for generation the last message is from the user, for training from the assistant.

    Raises:
        ValidationError: naming the index of the offending message.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValidationError("messages must be a non-empty list")
    system = None
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValidationError(f"messages[{i}] must be an object with 'role' and 'content'")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if role not in _ROLE_ALIASES:
            raise ValidationError(f"messages[{i}].role must be system, user or assistant, got {role!r}")
        if not isinstance(content, str):
            raise ValidationError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        role = _ROLE_ALIASES[role]
        if role == "system":
            if i != 0:
                raise ValidationError(f"messages[{i}]: a system message may only come first")
            system = content
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise ValidationError(f"messages[{i}].role is {role!r}, expected {expected!r} "
                                  "(user and assistant must alternate, starting with user)")
        turns.append((role, content))
    if not turns:
        raise ValidationError("messages contain no user message")
    last = turns[-1][0]
    if for_generation and last != "user":
        raise ValidationError("the last message must be from the user")
    if not for_generation and last != "assistant":
        raise ValidationError("a training conversation must end with an assistant message")
    return system, turns


Segment = tuple[str, bool, bool]  # (text, is_control_token, is_supervised)


def _template_parts(template: ChatTemplate, text: str, supervised: bool) -> list[Segment]:
    """Split a string written by the template itself at its control tokens."""
    if not template.special_texts or not text:
        return [(text, False, supervised)] if text else []
    pattern = "(" + "|".join(re.escape(s) for s in template.special_texts) + ")"
    return [(piece, j % 2 == 1, supervised) for j, piece in enumerate(re.split(pattern, text)) if piece]


def _segments(template: ChatTemplate, system: str | None, turns: list[tuple[str, str]],
              generation_prompt: bool) -> list[Segment]:
    """The conversation as segments. Only strings of the template can be control tokens; message
    text is always plain text."""
    tp = _template_parts
    segs: list[Segment] = []
    sys_text = template.system if system is None else template.clean_prompt(system)
    segs += [(sys_text, False, False)] if sys_text else []
    segs += tp(template, template.system_sep, False)
    for role, content in turns:
        if role == "user":
            segs += tp(template, template.user_prefix, False)
            segs.append((template.clean_prompt(content), False, False))
            segs += tp(template, template.seps[0], False)
        else:
            segs += tp(template, template.assistant_prefix, False)
            segs.append((template.answer_prefix + template.clean(content), False, True))
            segs += tp(template, template.seps[1], True)
    if generation_prompt:
        segs += tp(template, template.assistant_prefix, False)
    return segs


def _tokenize_segments(tokenizer, template: ChatTemplate, segs: list[Segment]) -> tuple[list[int], list[int]]:
    # Consecutive plain-text segments with the same supervision tokenize as one string (as the
    # original tokenized its whole prompt); control tokens and supervision changes are boundaries.
    merged: list[Segment] = []
    for seg in segs:
        if merged and not seg[1] and not merged[-1][1] and seg[2] == merged[-1][2]:
            merged[-1] = (merged[-1][0] + seg[0], False, seg[2])
        elif seg[0]:
            merged.append(seg)
    ids: list[int] = []
    mask: list[int] = []
    for text, control, sup in merged:
        if control:
            tid = tokenizer.token_to_id(text)
            if tid is None:
                raise ValidationError(f"template {template.name!r} needs the token {text!r}, "
                                      "which this tokenizer lacks")
            new = [tid]
        else:
            new = tokenizer.encode(text)
        ids.extend(new)
        mask.extend([int(sup)] * len(new))
    return ids, mask


def render(tokenizer, messages: Sequence[dict], template: str | ChatTemplate | None = None) -> list[int]:
    """Prompt ids for generation: the conversation, then the open assistant turn.

    ``messages``: OpenAI-form dicts, the last from the user. Control-token text inside messages
    stays text (see the module docstring).

    Raises:
        ValidationError: malformed messages or an unknown template.
    """
    tpl = get_template(template)
    system, turns = normalize_messages(messages, for_generation=True)
    ids, _ = _tokenize_segments(tokenizer, tpl, _segments(tpl, system, turns, True))
    return ids


def render_text(messages: Sequence[dict], template: str | ChatTemplate | None = None,
                *, generation_prompt: bool = True) -> str:
    """The rendered conversation as a string (for display and for comparing with the published format)."""
    tpl = get_template(template)
    system, turns = normalize_messages(messages, for_generation=generation_prompt)
    return "".join(seg[0] for seg in _segments(tpl, system, turns, generation_prompt))


def render_for_training(tokenizer, conversation: Sequence[dict],
                        template: str | ChatTemplate | None = None) -> tuple[list[int], list[int]]:
    """``(ids, loss_mask)`` of a whole conversation ending with an assistant answer.

    ``loss_mask[i]`` is 1 iff ``ids[i]`` belongs to an assistant answer or its end-of-turn marker.
    The ids up to each answer equal :func:`render` of the conversation up to that answer.

    Raises:
        ValidationError: malformed conversation or unknown template.
    """
    tpl = get_template(template)
    system, turns = normalize_messages(conversation, for_generation=False)
    return _tokenize_segments(tokenizer, tpl, _segments(tpl, system, turns, False))


# ---------------------------------------------------------------------------- other runtimes
def _jinja_str(text: str) -> str:
    """A double-quoted Jinja string literal. Only the escapes that Jinja2 and llama.cpp's Jinja
    engine (``common/jinja/lexer.h``) both know are used; other characters stay raw UTF-8."""
    out = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    if any(ord(c) < 0x20 for c in out):
        raise ValueError(f"cannot write {text!r} as a Jinja string literal")
    return f'"{out}"'


def _jinja_clean(template: ChatTemplate, expr: str, *, prompt: bool = False) -> str:
    """Jinja for :meth:`ChatTemplate.clean` of ``expr`` (:meth:`ChatTemplate.clean_prompt` with
    ``prompt``). Two passes of ``replace("##", "#\\u200b#")`` equal ``re.sub("#(?=#)", "#\\u200b", ...)``:
    the first leaves only pairs of ``#`` that straddle two replaced pairs, and those do not overlap."""
    for token in GUARDED_TOKENS:
        expr += f" | replace({_jinja_str(token)}, {_jinja_str(token[0] + _ZWSP + token[1:])})"
    if template.neutralize_hashes:
        expr += f' | replace("##", {_jinja_str("#" + _ZWSP + "#")})' * 2
    if prompt:
        for marker in MARKERS.values():
            expr += f" | replace({_jinja_str(marker)}, {_jinja_str(neutralize_markers(marker))})"
    return expr


def jinja_template(template: str | ChatTemplate | None = None) -> str:
    """The template as a Jinja chat template (Hugging Face ``tokenizer_config.json`` ``chat_template``,
    GGUF ``tokenizer.chat_template``).

    Rendered by transformers' ``apply_chat_template(messages, add_generation_prompt=True)``, vLLM or
    llama.cpp (``--jinja``) and tokenized with special-token matching, it gives exactly the ids of
    :func:`render` (and, for a conversation ending with an answer and ``add_generation_prompt=False``,
    of :func:`render_for_training`): message text is changed as :meth:`ChatTemplate.clean` changes
    it, and the template's control tokens are written as their text. Messages in the wrong order
    raise through ``raise_exception``, as :func:`normalize_messages` does.
    """
    tpl = get_template(template)
    s = _jinja_str
    content = "message['content']"
    return "".join([
        f"{{#- aquilachat chat template {tpl.name!r} (aquilachat.chat_format.jinja_template) -#}}\n",
        "{%- set offset = 1 if messages and messages[0]['role'] == 'system' else 0 -%}\n",
        f"{{%- if offset == 0 -%}}{{{{- {s(tpl.system + tpl.system_sep)} -}}}}{{%- endif -%}}\n",
        "{%- for message in messages -%}\n",
        "{%- if message['role'] == 'system' -%}\n",
        "{%- if not loop.first -%}{{- raise_exception('a system message may only come first') -}}{%- endif -%}\n",
        f"{{{{- {_jinja_clean(tpl, content, prompt=True)} + {s(tpl.system_sep)} -}}}}\n",
        "{%- elif message['role'] in ['user', 'assistant'] -%}\n",
        "{%- if (message['role'] == 'user') != ((loop.index0 - offset) % 2 == 0) -%}"
        "{{- raise_exception('user and assistant messages must alternate, starting with user') -}}{%- endif -%}\n",
        "{%- if message['role'] == 'user' -%}\n",
        f"{{{{- {s(tpl.user_prefix)} + {_jinja_clean(tpl, content, prompt=True)} + {s(tpl.seps[0])} -}}}}\n",
        "{%- else -%}\n",
        f"{{{{- {s(tpl.assistant_prefix + tpl.answer_prefix)} + {_jinja_clean(tpl, content)} + {s(tpl.seps[1])} -}}}}\n",
        "{%- endif -%}\n",
        "{%- else -%}{{- raise_exception('message role must be system, user or assistant') -}}\n",
        "{%- endif -%}\n",
        "{%- endfor -%}\n",
        f"{{%- if add_generation_prompt -%}}{{{{- {s(tpl.assistant_prefix)} -}}}}{{%- endif -%}}\n",
    ])


def template_name_of(chat_template: str | None) -> str | None:
    """The name of the template whose :func:`jinja_template` is ``chat_template``, or ``None``
    (no template, or one that was not written by us). A template written by an earlier version of
    :func:`jinja_template` is recognised by its first line, which names it."""
    if not chat_template:
        return None
    exact = next((name for name in TEMPLATES if jinja_template(name) == chat_template), None)
    if exact is not None:
        return exact
    header = re.match(r"\{#- aquilachat chat template '([\w.-]+)' \(aquilachat\.chat_format\.jinja_template\) -#\}\n",
                      chat_template)
    return header.group(1) if header and header.group(1) in TEMPLATES else None


def ollama_template(template: str | ChatTemplate | None = None) -> str:
    """The template in Ollama's Go ``text/template`` syntax (a Modelfile ``TEMPLATE``).

    Uses ``.System`` (the request's system message, else the default system text written into the
    template) and ``.Messages``; ends with the open assistant turn. Go templates have no string
    replacement, so message text is not changed as :meth:`ChatTemplate.clean` does: in Ollama a user
    who types ``###`` or ``</s>`` can end a turn.
    """
    tpl = get_template(template)
    for text in (tpl.system, tpl.system_sep, tpl.user_prefix, tpl.assistant_prefix, tpl.answer_prefix, *tpl.seps):
        if "{{" in text or "}}" in text or '"""' in text:
            raise ValueError(f"template {tpl.name!r}: {text!r} cannot be written in a Go template")
    system = "{{ if .System }}{{ .System }}" + (f"{{{{ else }}}}{tpl.system}" if tpl.system else "") + "{{ end }}"
    return (system + tpl.system_sep
            + '{{ range .Messages }}{{ if eq .Role "user" }}' + tpl.user_prefix + "{{ .Content }}" + tpl.seps[0]
            + '{{ else if eq .Role "assistant" }}' + tpl.assistant_prefix + tpl.answer_prefix + "{{ .Content }}"
            + tpl.seps[1] + "{{ end }}{{ end }}" + tpl.assistant_prefix)
