"""Real English text for calibration and evaluation, disjoint, offline.

Default: CPython's language reference as shipped in `pydoc_data.topics` (79 topics, ~465k chars).
Topics overlap (the "compound" topic contains "if", "while", ...; "specialnames" contains
"customization", ...), so topics that share a paragraph are grouped, whole groups go to one side,
and the evaluation side keeps no paragraph that also occurs on the calibration side.
A user's own file (`--text FILE`) is split at the paragraph boundary nearest its middle; it must
decode as UTF-8 (or the encoding the user names), never with bytes silently replaced.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import NdpmoeError

EVAL_FRACTION = 0.3          # share of the reference text (in characters) held out for evaluation
_LINK_MIN_CHARS = 80         # paragraphs this long or longer tie their topics together


@dataclass(frozen=True)
class TextSplit:
    """Disjoint calibration and evaluation text, and where it came from."""
    calib: str
    eval: str
    source: str
    calib_topics: tuple[str, ...] = ()
    eval_topics: tuple[str, ...] = ()

    @property
    def digest(self) -> str:
        """Short hash of both halves: cache keys change when the text does."""
        h = hashlib.sha256(self.calib.encode() + b"\0" + self.eval.encode())
        return h.hexdigest()[:12]


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, stripped, empty ones dropped."""
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _unique(paras: list[str], exclude: set[str] = frozenset()) -> list[str]:
    seen, out = set(exclude), []
    for p in paras:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def _topic_groups(topics: dict[str, str]) -> list[list[str]]:
    """Topics that share a long paragraph, grouped (union-find), each group sorted by name."""
    parent = {k: k for k in topics}

    def find(k):
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    first_owner: dict[str, str] = {}
    for name in sorted(topics):
        for p in paragraphs(topics[name]):
            if len(p) < _LINK_MIN_CHARS:
                continue
            if p in first_owner:
                parent[find(name)] = find(first_owner[p])
            else:
                first_owner[p] = name
    groups: dict[str, list[str]] = {}
    for name in sorted(topics):
        groups.setdefault(find(name), []).append(name)
    return list(groups.values())


def split_topics(topics: dict[str, str], eval_fraction: float = EVAL_FRACTION, source: str = "topics") -> TextSplit:
    """Split named documents by topic group into disjoint calibration and evaluation text.

    Deterministic: groups are taken largest first (ties by name) and each goes to the side that is
    further below its target share, so the split depends only on the text.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), not {eval_fraction!r}")
    if len(topics) < 2:
        raise ValueError(f"need at least 2 topics to split by topic, got {len(topics)}")
    groups = _topic_groups(topics)
    size = {tuple(g): sum(len(topics[k]) for k in g) for g in groups}
    total = sum(size.values())
    calib_names, eval_names, filled = [], [], {"calib": 0, "eval": 0}
    for g in sorted(groups, key=lambda g: (-size[tuple(g)], g[0])):
        want_eval = filled["eval"] / (eval_fraction * total) < filled["calib"] / ((1 - eval_fraction) * total)
        side = "eval" if want_eval else "calib"
        (eval_names if want_eval else calib_names).extend(g)
        filled[side] += size[tuple(g)]
    calib_names.sort()
    eval_names.sort()
    calib_paras = _unique([p for k in calib_names for p in paragraphs(topics[k])])
    eval_paras = _unique([p for k in eval_names for p in paragraphs(topics[k])], exclude=set(calib_paras))
    return TextSplit("\n\n".join(calib_paras), "\n\n".join(eval_paras), source,
                     tuple(calib_names), tuple(eval_names))


def reference_text(eval_fraction: float = EVAL_FRACTION) -> TextSplit:
    """CPython's own language reference (`pydoc_data.topics`), split by topic. Nothing to download."""
    import sys

    from pydoc_data.topics import topics

    version = ".".join(map(str, sys.version_info[:3]))
    return split_topics(dict(topics), eval_fraction, source=f"pydoc_data.topics (CPython {version})")


def read_text_file(path: str | Path, encoding: str | None = None) -> str:
    """The whole file as text: UTF-8 (a byte-order mark allowed) unless `encoding` is named.
    Bytes that do not decode, or NUL bytes (binary data, UTF-16 without a mark), are refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist")
    data = path.read_bytes()
    if encoding is None:
        if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
            raise NdpmoeError(f"text file {str(path)!r} is UTF-16 (it starts with a UTF-16 byte-order mark); "
                              f"convert it to UTF-8 or pass --encoding utf-16")
        encoding = "utf-8-sig"
    try:
        text = data.decode(encoding)
    except LookupError:
        raise NdpmoeError(f"--encoding {encoding!r} is not a text encoding Python knows (e.g. utf-8, latin-1, "
                          f"utf-16)") from None
    except UnicodeDecodeError as exc:
        raise NdpmoeError(f"text file {str(path)!r} is not valid {exc.encoding} (byte {exc.start} is "
                          f"{data[exc.start:exc.start + 1]!r}); pass --encoding NAME if it is text in another "
                          f"encoding") from None
    if "\0" in text:
        raise NdpmoeError(f"text file {str(path)!r} holds NUL characters (at character {text.index(chr(0))}): "
                          f"binary data, or UTF-16 without a byte-order mark (then pass --encoding utf-16-le)")
    return text


def file_text(path: str | Path, encoding: str | None = None) -> TextSplit:
    """A user's text file: first half (by characters, cut at a paragraph boundary) calibrates,
    the second half evaluates."""
    path = Path(path)
    text = read_text_file(path, encoding)
    paras = paragraphs(text)
    if len(paras) < 2:
        raise ValueError(f"text file {str(path)!r} needs at least 2 paragraphs (blank-line separated) "
                         f"to split into calibration and evaluation halves, found {len(paras)}")
    half, acc, cut = sum(len(p) for p in paras) / 2, 0, 1
    for i, p in enumerate(paras[:-1], start=1):
        acc += len(p)
        cut = i
        if acc >= half:
            break
    calib, evals = paras[:cut], _unique(paras[cut:], exclude=set(paras[:cut]))
    if not evals:
        raise ValueError(f"text file {str(path)!r}: its second half repeats its first, nothing left to evaluate on")
    return TextSplit("\n\n".join(calib), "\n\n".join(evals), str(path))


def load_text(path: str | Path | None = None, encoding: str | None = None) -> TextSplit:
    """The user's file when given (`--text FILE`), else the CPython reference text."""
    return reference_text() if path is None else file_text(path, encoding)


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """Whole text -> 1-D LongTensor of token ids (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_windows(tokens: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [N, seq_len] from a 1-D token stream.

    With max_tokens, N = max_tokens // seq_len windows are taken evenly spaced over the whole
    stream (so a short evaluation still samples every part of the text, deterministically).
    """
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, not {seq_len!r}")
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    total = tokens.numel() // seq_len
    if total == 0:
        raise ValueError(f"text has {tokens.numel()} tokens, fewer than one window of seq_len={seq_len}")
    windows = tokens[: total * seq_len].view(total, seq_len)
    if max_tokens is None:
        return windows
    want = max_tokens // seq_len
    if want < 1:
        raise ValueError(f"max_tokens={max_tokens} is less than one window of seq_len={seq_len}")
    if want >= total:
        return windows
    pick = torch.linspace(0, total - 1, want).round().long()
    return windows[pick]
