"""Held-out text for `salaconvert eval`: perplexity windows and the haystack for retrieval.

Sources (`--data`): `.jsonl` / `.jsonl.xz` files of `{"text": ...}` documents (the shared corpus
format), plain `.txt` / `.txt.xz` files (one document each), or the name `pydoc` for Python's own
`pydoc_data.topics` (~465K characters of English prose, on every machine; the default).

Held-out split, fixed by document: in every JSONL file, document i (0-based, file order) is held
out when i % 10 == 9, and only those documents are read here. Training code should leave the same
documents out. `pydoc` and `.txt` sources are used whole: they are not part of the corpus files.
(pydoc topics derive from the Python reference manual, which the python-docs corpus also holds, so
pass `--data` with a corpus file for a strictly held-out number.)
"""
import json
import lzma
from dataclasses import dataclass
from pathlib import Path

from salaconvert.errors import InputError

HELD_OUT_EVERY = 10  # document i is held out when i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
CHARS_PER_TOKEN_GUESS = 3  # low on purpose: reading too much text is cheaper than reading twice


@dataclass
class TextSource:
    name: str
    documents: list[str]
    held_out: str  # how the split was made, for the report


def read_source(spec: str) -> TextSource:
    """One `--data` entry as its held-out documents. Raises InputError if it cannot be read."""
    if spec == "pydoc":
        from pydoc_data.topics import topics

        return TextSource("pydoc", [topics[k] for k in sorted(topics)], "whole (pydoc_data.topics)")
    path = Path(spec).expanduser()
    if not path.is_file():
        raise InputError(f"--data {spec}: no such file (give a .jsonl[.xz] or .txt[.xz] file, or 'pydoc')")
    opener = lzma.open if path.suffix == ".xz" else open
    stem = path.name.removesuffix(".xz")
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            if stem.endswith(".jsonl"):
                docs = [json.loads(line)["text"] for i, line in enumerate(f)
                        if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 and line.strip()]
                held_out = f"documents i % {HELD_OUT_EVERY} == {HELD_OUT_EVERY - 1}"
            else:
                docs, held_out = [f.read()], "whole file"
    except (OSError, ValueError, KeyError, lzma.LZMAError) as e:
        raise InputError(f"--data {spec}: cannot read it ({type(e).__name__}: {str(e)[:120]})") from None
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise InputError(f"--data {spec}: no held-out text in it")
    return TextSource(path.name, docs, held_out)


def token_stream(sources: list[TextSource], tokenizer, n_tokens: int) -> tuple[list[int], bool]:
    """`n_tokens` token ids of the sources' documents joined by blank lines, and whether the text
    had to be repeated to get that many (which flatters long-context perplexity: the report says
    so). Tokenizes only as much text as it needs."""
    text = "\n\n".join(d for s in sources for d in s.documents)
    if not text.strip():
        raise InputError("--data: the held-out text is empty")
    chars = max(n_tokens * CHARS_PER_TOKEN_GUESS, 1024)
    encode = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    while chars < len(text):
        ids = encode(text[:chars])
        if len(ids) >= n_tokens:
            return ids[:n_tokens], False
        chars *= 2
    ids = encode(text)
    if len(ids) >= n_tokens:
        return ids[:n_tokens], False
    return encode((text + "\n\n") * (n_tokens // max(len(ids), 1) + 1))[:n_tokens], True
