"""AquilaChat's image instructions: ``#text2image#`` and ``#InstructFace#`` blocks in an answer.

AquilaChat-7B was fine-tuned to hand drawing and face-editing requests to other models by ending
its answer with an instruction block (FlagAI's SFT data, ``examples/Aquila/Aquila-chat/data/
sft_samples.jsonl``)::

    <preface>\\n#text2image#\\n<one line: the image prompt>
    <preface>\\n#InstructFace#\\n<edit step 1>\\n<edit step 2>...

FlagAI never published the code that carried these out; this module only recognises them.
:func:`parse_instruction` reads a finished answer; :class:`InstructionStream` follows a streamed
one and says as soon as a block has begun. The rules (all must hold, otherwise the answer is
ordinary text and ``None`` is returned):

1. the marker is the exact text ``#text2image#`` or ``#InstructFace#``, alone on its line: at the
   start of the answer or after a newline, and followed by a newline;
2. the answer has exactly one marker, and it is not inside a fenced code block (an odd number of
   ```` ``` ```` before it): a model explaining the format is not calling it;
3. the payload is the rest of the answer: ``#text2image#`` takes exactly one non-empty line
   (the prompt), ``#InstructFace#`` one or more (the edit steps, in order); blank lines around
   them are dropped, surrounding whitespace stripped.

Forging. A user who writes ``#text2image#`` in a message could get the model to copy it into its
answer. The chat templates therefore neutralise the markers in system and user messages as they
neutralise ``###``: :meth:`aquilachat.chat_format.ChatTemplate.clean` puts a zero-width space
(U+200B) after the first ``#`` (:func:`neutralize_markers`), so the model sees and can only
copy ``#\\u200btext2image#``, which rule 1 does not match. Assistant messages keep their markers:
they are the model's own earlier answers, and the SFT data trains exactly that text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["TEXT2IMAGE", "INSTRUCT_FACE", "MARKERS", "Instruction", "parse_instruction", "InstructionStream",
           "neutralize_markers"]

#: The kinds, as the markers name them.
TEXT2IMAGE = "text2image"
INSTRUCT_FACE = "InstructFace"
#: The marker text of each kind.
MARKERS = {TEXT2IMAGE: "#text2image#", INSTRUCT_FACE: "#InstructFace#"}
_ZWSP = "\u200b"
_FENCE = "```"


@dataclass(frozen=True)
class Instruction:
    """One instruction block found in an answer.

    Attributes:
        kind: ``"text2image"`` or ``"InstructFace"``.
        preface: the answer's text before the marker line (its trailing newline removed).
        steps: the payload lines: one image prompt for ``text2image``, the edit steps in order
            for ``InstructFace``.
    """

    kind: Literal["text2image", "InstructFace"]
    preface: str
    steps: tuple[str, ...]

    @property
    def prompt(self) -> str:
        """The image prompt (``text2image``), or the edit steps joined by newlines."""
        return "\n".join(self.steps)


def neutralize_markers(text: str) -> str:
    """``text`` with every marker made inert: ``#text2image#`` -> ``#\\u200btext2image#`` (invisible
    when displayed). Used on system and user messages by the chat templates."""
    for marker in MARKERS.values():
        text = text.replace(marker, marker[0] + _ZWSP + marker[1:])
    return text


def _marker_lines(text: str) -> list[tuple[str, int, int]]:
    """``(kind, start, end)`` of every marker alone on a line (rule 1; ``end`` is past its newline,
    or ``len(text)`` when the text ends right after the marker)."""
    found = []
    for kind, marker in MARKERS.items():
        start = text.find(marker)
        while start >= 0:
            end = start + len(marker)
            at_line_start = start == 0 or text[start - 1] == "\n"
            at_line_end = end == len(text) or text[end] == "\n"
            if at_line_start and at_line_end:
                found.append((kind, start, min(end + 1, len(text))))
            start = text.find(marker, end)
    return sorted(found, key=lambda f: f[1])


def parse_instruction(answer: str) -> Instruction | None:
    """The instruction block of a finished ``answer``, or ``None`` for ordinary text (rules in
    the module docstring).

    Example (FlagAI's SFT sample ``sft_v0.8.9_val.jsonl_12``, shortened)::

        >>> parse_instruction("我可以尝试为您调用文生图模型进行图像生成。\\n#text2image#\\n拉里黄瓜，数字绘画")
        Instruction(kind='text2image', preface='我可以尝试为您调用文生图模型进行图像生成。', steps=('拉里黄瓜，数字绘画',))
    """
    markers = _marker_lines(answer)
    if len(markers) != 1:
        return None
    kind, start, end = markers[0]
    if answer.count(_FENCE, 0, start) % 2:
        return None
    steps = tuple(line.strip() for line in answer[end:].splitlines() if line.strip())
    if not steps or (kind == TEXT2IMAGE and len(steps) != 1):
        return None
    return Instruction(kind=kind, preface=answer[:start].removesuffix("\n").rstrip(), steps=steps)


class InstructionStream:
    """Follows a streamed answer: :meth:`feed` each text delta; :attr:`kind` tells as soon as a
    marker line has been seen outside a code block (so a client can say "drawing..." early; only
    :meth:`finish` decides whether the block is valid), and
    :meth:`finish` parses the whole answer once it has ended (a block is only complete then, since
    its payload runs to the end of the answer).

    The deltas are not changed: the answer's text reaches the client as generated.
    """

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._text = ""
        self.kind: str | None = None

    @property
    def text(self) -> str:
        """The answer so far."""
        if self._parts:
            self._text += "".join(self._parts)
            self._parts.clear()
        return self._text

    def feed(self, delta: str) -> str | None:
        """Add ``delta``; return :attr:`kind` (``None`` until a marker line is complete)."""
        self._parts.append(delta)
        if self.kind is None and "\n" in delta:
            text = self.text
            for kind, start, end in _marker_lines(text):
                # a marker line is complete once its newline has arrived
                if end > start + len(MARKERS[kind]) and not text.count(_FENCE, 0, start) % 2:
                    self.kind = kind
                    break
        return self.kind

    def finish(self) -> Instruction | None:
        """The instruction of the whole answer (:func:`parse_instruction`), or ``None``."""
        return parse_instruction(self.text)
