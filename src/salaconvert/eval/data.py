"""Held-out text for `salaconvert eval`: perplexity windows and the haystack for retrieval.

Sources (`--data`): whatever `salaconvert distill` reads (`.jsonl`, `.txt`, `.parquet`, optionally
`.gz`/`.xz`, HF dataset directories, folders of such files), or the name `pydoc` for Python's own
`pydoc_data.topics` (~465K characters of English prose, on every machine; the default).

Held-out split, fixed by document, and the same rule as distillation's
(`salaconvert.distill.data.split_documents`): a document is held out when the first 8 bytes of
the SHA-1 of its text, as an integer, fall below `heldout_fraction` of 2^64. The fraction is the
one in the checkpoint's distillation recipe when it has one, so a distilled hybrid is scored only
on documents it never trained on (any smaller fraction picks a subset of those); otherwise the
recipes' default, 0.02. `pydoc` is used whole: it is not training data (though it derives from
the Python reference manual, which the python-docs corpus also holds).
"""
from dataclasses import dataclass
from pathlib import Path

from salaconvert.errors import InputError

DEFAULT_HELDOUT_FRACTION = 0.02  # recipes/halo.yaml's data.heldout_fraction
CHARS_PER_TOKEN_GUESS = 3  # low on purpose: reading too much text is cheaper than reading twice


@dataclass
class TextSource:
    name: str
    documents: list[str]
    held_out: str  # how the split was made, for the report


def read_source(spec: str, heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> TextSource:
    """One `--data` entry as its held-out documents. Raises InputError if it cannot be read."""
    if spec == "pydoc":
        from pydoc_data.topics import topics

        return TextSource("pydoc", [topics[k] for k in sorted(topics)], "whole (pydoc_data.topics)")
    from salaconvert.distill.data import read_documents, split_documents

    if not Path(spec).expanduser().exists():
        raise InputError(f"--data {spec}: no such file or directory (or give 'pydoc')")
    docs = read_documents([spec])
    if heldout_fraction <= 0:
        return TextSource(Path(spec).name, [d.text for d in docs], "whole (no split)")
    _, held = split_documents(docs, heldout_fraction)
    return TextSource(Path(spec).name, [d.text for d in held],
                      f"sha1(text)[:8] < {heldout_fraction} of 2^64, as distill ({len(held)} of {len(docs)} documents)")


def heldout_fraction_of(model_dir: str) -> float | None:
    """The held-out fraction of the recipe a checkpoint was distilled with, if it was."""
    from salaconvert.io.checkpoint import read_sidecar

    path = Path(model_dir)
    recipe = read_sidecar(path).get("recipe") if path.is_dir() else None
    fraction = (recipe or {}).get("data", {}).get("heldout_fraction")
    return float(fraction) if isinstance(fraction, (int, float)) else None


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
