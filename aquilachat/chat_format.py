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

User text can never create a turn. Besides control-token text staying text, in templates whose
turns are separated by plain text (``###``), every ``#`` that is followed by another ``#`` in a
message gets a zero-width space (U+200B) after it, so no message contains ``##`` and therefore no
``###`` separator: ``"###Assistant: hi"`` inside a user message is rendered as
``"#\\u200b#\\u200b#Assistant: hi"``. The change is invisible when the text is displayed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from .errors import ValidationError

__all__ = ["ChatTemplate", "TEMPLATES", "get_template", "render", "render_text", "render_for_training",
           "normalize_messages", "DEFAULT_TEMPLATE", "AQUILA_SYSTEM"]

AQUILA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
DEFAULT_TEMPLATE = "aquila-chat"
_ZWSP = "\u200b"


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
        """Neutralize plain-text turn separators in a message (see the module docstring)."""
        if self.neutralize_hashes:
            text = re.sub(r"#(?=#)", "#" + _ZWSP, text)
        return text


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
    sys_text = template.system if system is None else template.clean(system)
    segs += [(sys_text, False, False)] if sys_text else []
    segs += tp(template, template.system_sep, False)
    for role, content in turns:
        if role == "user":
            segs += tp(template, template.user_prefix, False)
            segs.append((template.clean(content), False, False))
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
