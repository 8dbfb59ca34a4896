"""Tokenisation through the ``tokenizers`` library, and chat templates through jinja2.

A :class:`Tokenizer` comes from a checkpoint directory (``tokenizer.json`` + ``tokenizer_config.json``
+ ``generation_config.json``) or from the vocabulary, merges and special tokens a GGUF file carries
(byte-level BPE, with the pre-tokenizer llama.cpp names in ``tokenizer.ggml.pre``).  Chat templates
render as HuggingFace renders them (sandboxed jinja2, ``trim_blocks``/``lstrip_blocks``, ``tojson``,
``raise_exception``), and the rendered text is encoded without adding special tokens again.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from mpkir.diagnostics import error

# llama.cpp pre-tokenizer kinds → split regex (None: GPT-2's regex inside ByteLevel) and digit handling.
_GPT2 = None
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS: dict[str, tuple[str | None, bool, bool]] = {
    # kind: (split regex, individual digits first, BPE ignore_merges)
    "gpt2": (_GPT2, False, False),
    "default": (_GPT2, False, False),
    "smollm": (_GPT2, True, False),
    "starcoder": (_GPT2, True, False),
    "refact": (_GPT2, True, False),
    "llama-bpe": (_LLAMA3, False, True),
    "llama3": (_LLAMA3, False, True),
    "qwen2": (_QWEN2, False, False),
}

TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise error("tokenisation needs the 'tokenizers' package: pip install -e '.[models]'") from e
    return tokenizers


class Tokenizer:
    """Text ↔ token ids, special ids and the chat template of one model."""

    def __init__(
        self,
        tok,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
        chat_template: str | None = None,
        add_bos: bool = False,
    ):
        self.tok = tok
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(int(e) for e in eos_token_ids)
        self.chat_template = chat_template
        self.add_bos = add_bos
        self._template = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """From a HuggingFace checkpoint directory (``tokenizer.json`` and its companions)."""
        tokenizers = _require_tokenizers()
        d = Path(path)
        d = d if d.is_dir() else d.parent
        tj = d / "tokenizer.json"
        if not tj.exists():
            raise error(f"{d} has no tokenizer.json")
        tok = tokenizers.Tokenizer.from_file(str(tj))
        tcfg = _read_json(d / "tokenizer_config.json")
        gcfg = _read_json(d / "generation_config.json")
        mcfg = _read_json(d / "config.json")

        def tid(v: Any) -> int | None:
            if v is None:
                return None
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, int):
                return v
            return tok.token_to_id(str(v))

        bos = tid(tcfg.get("bos_token"))
        if bos is None:
            bos = gcfg.get("bos_token_id", mcfg.get("bos_token_id"))
        eos: list[int] = []
        for v in (gcfg.get("eos_token_id"), mcfg.get("eos_token_id"), tid(tcfg.get("eos_token"))):
            for e in v if isinstance(v, list) else [v]:
                if e is not None and int(e) not in eos:
                    eos.append(int(e))
        template = tcfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next(
                (t["template"] for t in template if t.get("name") == "default"), template[0]["template"]
            )
        jt = d / "chat_template.jinja"
        if template is None and jt.exists():
            template = jt.read_text()
        return cls(tok, bos_token_id=bos, eos_token_ids=eos, chat_template=template)

    @classmethod
    def from_gguf_data(cls, data: dict) -> Tokenizer:
        """From :meth:`mpkir.models.gguf_loader.GGUFFile.tokenizer_data` (byte-level BPE vocabularies)."""
        tokenizers = _require_tokenizers()
        from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

        if data["model"] != "gpt2":
            raise error(
                f"GGUF tokenizer model '{data['model']}' is not supported (only byte-level "
                "BPE, tokenizer.ggml.model = gpt2)"
            )
        pre = data.get("pre") or "default"
        if pre not in PRE_TOKENIZERS:
            raise error(f"GGUF pre-tokenizer '{pre}' is not supported (known: {', '.join(PRE_TOKENIZERS)})")
        regex, digits, ignore_merges = PRE_TOKENIZERS[pre]
        tokens: list[str] = data["tokens"]
        vocab = {t: i for i, t in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in data["merges"]]
        model = models.BPE(vocab, merges, ignore_merges=ignore_merges)
        tok = tokenizers.Tokenizer(model)
        parts = []
        if digits:
            parts.append(pre_tokenizers.Digits(individual_digits=True))
        if regex is None:
            parts.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
        else:
            parts.append(pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False))
            parts.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
        tok.pre_tokenizer = parts[0] if len(parts) == 1 else pre_tokenizers.Sequence(parts)
        if pre == "qwen2":
            tok.normalizer = normalizers.NFC()
        tok.decoder = decoders.ByteLevel()
        types = data.get("token_type") or []
        added = []
        for i, t in enumerate(types):
            if t in (TOKEN_CONTROL, TOKEN_USER_DEFINED):
                added.append(AddedToken(tokens[i], special=t == TOKEN_CONTROL, normalized=False))
        if added:
            tok.add_special_tokens([a for a in added if a.special])
            tok.add_tokens([a for a in added if not a.special])
        eos = [int(x) for x in (data.get("eos_token_id"), data.get("eot_token_id")) if x is not None]
        bos = data.get("bos_token_id")
        return cls(
            tok,
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=dict.fromkeys(eos),
            chat_template=data.get("chat_template"),
            add_bos=bool(data.get("add_bos_token")),
        )

    # ------------------------------------------------------------------ text ↔ ids
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(self.tok.encode(text, add_special_tokens=add_special_tokens).ids)
        if (
            add_special_tokens
            and self.add_bos
            and self.bos_token_id is not None
            and ids[:1] != [self.bos_token_id]
        ):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(int(i))

    # ------------------------------------------------------------------ chat
    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """The checkpoint's chat template applied to ``messages`` (role/content dicts)."""
        if self.chat_template is None:
            raise error("this model has no chat template: use a plain prompt")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        bos = self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else ""
        eos = self.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else ""
        return self._template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=bos or "",
            eos_token=eos or "",
            **extra,
        )

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """Render the chat template and encode it (special tokens come from the template text)."""
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)

    def prompt_ids(self, prompt: str, chat: bool | None = None) -> list[int]:
        """A user prompt as ids: through the chat template when there is one (or ``chat`` says so)."""
        if chat is None:
            chat = self.chat_template is not None
        if chat:
            return self.encode_chat([{"role": "user", "content": prompt}])
        return self.encode(prompt)

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Incremental detokenisation: feed ids one at a time, get the new text (complete UTF-8 only)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.t = tokenizer
        self.ids: list[int] = []
        self.emitted = ""
        self.skip = skip_special_tokens

    def feed(self, ids: Iterable[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        text = self.t.decode(self.ids, skip_special_tokens=self.skip)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for more bytes
            return ""
        delta = text[len(self.emitted) :] if text.startswith(self.emitted) else text
        self.emitted = text
        return delta

    def flush(self) -> str:
        """Whatever is left at the end of the stream (an incomplete character decodes as U+FFFD)."""
        text = self.t.decode(self.ids, skip_special_tokens=self.skip)
        delta = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted = text
        return delta


def _read_json(p: Path) -> dict:
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{p}: invalid JSON: {e}") from e


def _compile_template(source: str):
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise error("chat templates need the 'jinja2' package: pip install -e '.[models]'") from e

    def raise_exception(message: str):
        raise error(f"chat template: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise error(f"chat template does not compile: {e}") from e


CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_tiny_tokenizer(
    directory: str | Path, vocab_size: int = 300, corpus: Sequence[str] = ()
) -> Tokenizer:
    """Train a small byte-level BPE (ChatML specials) into ``directory`` (tests, toy checkpoints).

    Writes ``tokenizer.json`` and ``tokenizer_config.json``; the vocabulary has exactly ``vocab_size``
    tokens when the corpus has enough merges (else fewer).
    """
    tokenizers = _require_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = list(corpus) or [
        "The quick brown fox jumps over the lazy dog. " * 4,
        "What is the capital of France? Paris is the capital of France.",
        "Once upon a time there was a small model that wrote text one token at a time.",
        "def add(a, b):\n    return a + b\n" * 3,
    ]
    tok.train_from_iterator(text, trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": None, "eos_token": "<|im_end|>", "chat_template": CHATML_TEMPLATE}, indent=1)
    )
    return Tokenizer.from_dir(d)
