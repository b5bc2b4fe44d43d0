"""Byte-level BPE tokenizer on the ``tokenizers`` library, and a UTF-8-safe incremental detokenizer.

Files read (Hugging Face / GPT-2 layout): ``tokenizer.json``, or ``vocab.json`` + ``merges.txt``;
``special_tokens_map.json``, ``tokenizer_config.json`` (``added_tokens_decoder``) and
``added_tokens.json`` are honoured. Aquila's published files (``Aquila-tokenizer-hf``) have a
100000-entry ``vocab.json`` without its eight special tokens; they are added at ids 100000-100007
in FlagAI's order (``AQUILA_SPECIAL_TOKENS``), as in ``vocab.json.llama.cpp``.

User text never becomes control tokens: :meth:`Tokenizer.encode` tokenizes text that looks like a
special token (``</s>``, ``[CLS]``) as plain text unless the caller passes ``allow_special=True``.
"""

from __future__ import annotations

import codecs
import json
import os
from functools import cached_property
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from .errors import TokenizerError

__all__ = ["Tokenizer", "IncrementalDetokenizer", "AQUILA_SPECIAL_TOKENS", "bytes_to_unicode"]

#: Aquila's special tokens, at ids 100000.. in this order (FlagAI ``AquilaTokenizer``).
AQUILA_SPECIAL_TOKENS = ("<|startofpiece|>", "<|endofpiece|>", "<|LDWANG|>", "[MASK]", "[gMASK]",
                         "[sMASK]", "[CLS]", "</s>")
AQUILA_BASE_VOCAB_SIZE = 100000


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (openai/gpt-2 ``encoder.py``)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_BYTE_DECODER = {c: b for b, c in bytes_to_unicode().items()}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    except UnicodeDecodeError:
        raise TokenizerError(f"{path}: not UTF-8 text") from None


def _token_text(value) -> str | None:
    """``special_tokens_map.json`` values are strings or ``{"content": ...}`` dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A byte-level BPE tokenizer with special tokens.

    Attributes:
        bos_token_id, eos_token_id, pad_token_id, unk_token_id: ids or ``None``.
        special_tokens: ``{text: id}`` of the added (control) tokens.
        vocab_size: number of ids this tokenizer can decode (``0 .. vocab_size - 1``).
        chat_template: the Jinja ``chat_template`` of ``tokenizer_config.json`` (``None`` when
            absent), kept so that :meth:`save` writes it back.
    """

    def __init__(self, backend: HFTokenizer, *, special_tokens_map: dict | None = None,
                 name_or_path: str = "", model_max_length: int | None = None,
                 chat_template: str | None = None) -> None:
        self._plain = backend  # encodes special-token text as plain text
        self._plain.encode_special_tokens = True
        self._special = HFTokenizer.from_str(backend.to_str())  # matches special tokens in text
        self._special.encode_special_tokens = False
        self.name_or_path = name_or_path
        self.model_max_length = model_max_length
        self.chat_template = chat_template
        self.special_tokens_map = dict(special_tokens_map or {})
        decoder = backend.get_added_tokens_decoder()
        self.special_tokens: dict[str, int] = {t.content: i for i, t in decoder.items() if t.special}
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        ids = set(backend.get_vocab(with_added_tokens=True).values())
        if ids != set(range(self.vocab_size)):
            raise TokenizerError(f"{name_or_path}: token ids are not contiguous 0..{self.vocab_size - 1}")

        def tid(key: str) -> int | None:
            text = self.special_tokens_map.get(key)
            return None if text is None else backend.token_to_id(text)

        self.bos_token_id = tid("bos_token")
        self.eos_token_id = tid("eos_token")
        self.pad_token_id = tid("pad_token")
        self.unk_token_id = tid("unk_token")

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load from a directory with ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``.

        Raises:
            TokenizerError: the files are missing, malformed or give non-contiguous ids; the
                message names the file.
        """
        path = Path(path)
        if not path.is_dir():
            raise TokenizerError(f"{path}: tokenizer directory not found")
        stm_path, cfg_path = path / "special_tokens_map.json", path / "tokenizer_config.json"
        stm = _read_json(stm_path) if stm_path.exists() else {}
        cfg = _read_json(cfg_path) if cfg_path.exists() else {}
        special_map = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            text = _token_text(stm.get(key, cfg.get(key)))
            if text is not None:
                special_map[key] = text
        if (path / "tokenizer.json").exists():
            try:
                backend = HFTokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as exc:  # the Rust library raises a plain Exception
                raise TokenizerError(f"{path / 'tokenizer.json'}: cannot be read: {exc}") from None
        elif (path / "vocab.json").exists() and (path / "merges.txt").exists():
            backend = cls._from_vocab_merges(path, cfg, special_map)
        else:
            raise TokenizerError(f"{path}: no tokenizer.json, nor vocab.json with merges.txt")
        # Special tokens named in the maps but not known yet are appended (as transformers does).
        missing = [t for t in special_map.values() if backend.token_to_id(t) is None]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)])
        chat_template = cfg.get("chat_template")
        if isinstance(chat_template, list):  # named templates: [{"name": ..., "template": ...}]
            chat_template = next((t.get("template") for t in chat_template
                                  if isinstance(t, dict) and t.get("name") == "default"), None)
        return cls(backend, special_tokens_map=special_map, name_or_path=str(path),
                   model_max_length=cfg.get("model_max_length"),
                   chat_template=chat_template if isinstance(chat_template, str) else None)

    @staticmethod
    def _from_vocab_merges(path: Path, cfg: dict, special_map: dict) -> HFTokenizer:
        vocab_path, merges_path = path / "vocab.json", path / "merges.txt"
        vocab = _read_json(vocab_path)
        if not isinstance(vocab, dict):
            raise TokenizerError(f"{vocab_path}: expected a JSON object of token -> id")
        try:
            bpe = models.BPE.from_file(str(vocab_path), str(merges_path))
        except Exception as exc:
            raise TokenizerError(f"{merges_path}: cannot be read with {vocab_path}: {exc}") from None
        backend = HFTokenizer(bpe)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(cfg.get("add_prefix_space", False)))
        backend.decoder = decoders.ByteLevel()
        added: dict[int, str] = {}
        added_path = path / "added_tokens.json"
        if added_path.exists():
            added.update({int(i): t for t, i in _read_json(added_path).items()})
        for i, info in (cfg.get("added_tokens_decoder") or {}).items():
            added[int(i)] = info["content"]
        added = {i: t for i, t in added.items() if vocab.get(t) != i}
        if (not added and len(vocab) == AQUILA_BASE_VOCAB_SIZE
                and any(t in AQUILA_SPECIAL_TOKENS and t not in vocab for t in special_map.values())):
            added = {AQUILA_BASE_VOCAB_SIZE + k: t for k, t in enumerate(AQUILA_SPECIAL_TOKENS)}
        for expected, (i, text) in enumerate(sorted(added.items()), start=len(vocab)):
            if i != expected:
                raise TokenizerError(f"{path}: added token {text!r} has id {i}, expected {expected} "
                                     f"(ids must follow the {len(vocab)}-entry vocab.json)")
            backend.add_special_tokens([AddedToken(text, special=True, normalized=False)])
        return backend

    # ------------------------------------------------------------------ API
    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added).

        Special-token text (``</s>``, ``[CLS]``) is tokenized as ordinary text unless
        ``allow_special`` is true: user text must never become control tokens.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        backend = self._special if allow_special else self._plain
        return backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], *, allow_special: bool = False) -> list[list[int]]:
        """:meth:`encode` for many texts at once (parallel in the Rust library)."""
        backend = self._special if allow_special else self._plain
        return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; bytes that are not valid UTF-8 become U+FFFD (as ``bytes.decode(errors='replace')``).

        Raises:
            TokenizerError: an id outside ``0 .. vocab_size - 1``.
        """
        return b"".join(self.token_bytes(int(i), skip_special_tokens) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int, skip_special_tokens: bool = False) -> bytes:
        """The bytes one token stands for (special tokens: their UTF-8 text, or b"" when skipped)."""
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        if token_id in self._special_ids:
            return b"" if skip_special_tokens else self._token_bytes[token_id]
        return self._token_bytes[token_id]

    @cached_property
    def _special_ids(self) -> frozenset[int]:
        return frozenset(self.special_tokens.values())

    @cached_property
    def _token_bytes(self) -> list[bytes]:
        """Bytes of every id. Byte-level tokens map through GPT-2's byte table; SentencePiece-style
        ``<0xAB>`` byte-fallback tokens and ``▁`` are handled for other tokenizer.json models."""
        table: list[bytes] = [b""] * self.vocab_size
        added = {t.content for t in self._plain.get_added_tokens_decoder().values()}
        byte_level = isinstance(self._plain.decoder, decoders.ByteLevel)
        for text, i in self._plain.get_vocab(with_added_tokens=True).items():
            if text in added:
                table[i] = text.encode("utf-8")
            elif byte_level and all(c in _BYTE_DECODER for c in text):
                table[i] = bytes(_BYTE_DECODER[c] for c in text)
            elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
                table[i] = bytes([int(text[3:5], 16)])
            else:
                table[i] = text.replace("\u2581", " ").encode("utf-8")
        return table

    def to_json(self) -> dict:
        """This tokenizer as a ``tokenizer.json`` dict (``model`` with ``vocab`` and ``merges``,
        ``pre_tokenizer``, ``normalizer``, ``decoder``, ``added_tokens``), for writing it in
        another format (GGUF)."""
        return json.loads(self._plain.to_str())

    def token_to_id(self, token: str) -> int | None:
        """Id of a token's vocabulary string, or ``None``."""
        return self._plain.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Vocabulary string of an id, or ``None``."""
        return self._plain.id_to_token(token_id)

    def decodable_mask(self, model_vocab_size: int, device: "torch.device | str" = "cpu") -> "torch.Tensor":
        """``[model_vocab_size]`` bool: True for ids this tokenizer can decode.

        The model's vocabulary may be larger than the tokenizer's (padding rows); sampling masks
        the rest so that it never produces an id without text.
        """
        import torch  # here: the tokenizer (and the chat templates, the CLI's parser) load without torch
        mask = torch.zeros(model_vocab_size, dtype=torch.bool, device=device)
        mask[: min(model_vocab_size, self.vocab_size)] = True
        return mask

    def __len__(self) -> int:
        return self.vocab_size

    # ------------------------------------------------------------------ saving
    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json``, ``vocab.json``, ``merges.txt`` (byte-level BPE),
        ``special_tokens_map.json`` and ``tokenizer_config.json`` (with :attr:`chat_template` when
        set), loadable by ``transformers.AutoTokenizer`` and :meth:`from_dir`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._plain.encode_special_tokens = False  # not a file property; keep the saved file neutral
        try:
            self._plain.save(str(path / "tokenizer.json"))
        finally:
            self._plain.encode_special_tokens = True
        model = self._plain.model
        if isinstance(model, models.BPE):
            model.save(str(path))  # vocab.json + merges.txt of the base vocabulary
        (path / "special_tokens_map.json").write_text(json.dumps(self.special_tokens_map, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.model_max_length or 2048,
            **self.special_tokens_map,
            "added_tokens_decoder": {
                str(i): {"content": t.content, "special": t.special, "normalized": t.normalized,
                         "lstrip": t.lstrip, "rstrip": t.rstrip, "single_word": t.single_word}
                for i, t in sorted(self._plain.get_added_tokens_decoder().items())
            },
        }
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas that never split a UTF-8 character.

    Bytes of an incomplete multi-byte character are held back until the character completes;
    invalid bytes become U+FFFD exactly as in :meth:`Tokenizer.decode`, so the deltas joined (after
    :meth:`flush`) equal ``tokenizer.decode(all_ids)``. Uses Python's incremental UTF-8 decoder
    (``codecs.getincrementaldecoder``), which is specified to agree with one-shot decoding.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now complete (maybe "")."""
        return self._decoder.decode(self.tokenizer.token_bytes(int(token_id), self.skip_special_tokens))

    def flush(self) -> str:
        """End of stream: held-back incomplete bytes become U+FFFD."""
        return self._decoder.decode(b"", final=True)
