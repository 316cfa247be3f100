"""Calibration text and the probes built from it (SPEC §4).

Everything here is real text: by default the English prose that ships with Python
(`pydoc_data.topics`), or the user's `.txt` / `.jsonl` (field `text`) files, optionally `.gz` /
`.xz`. Documents are shuffled with the seed, tokenised with the model's own tokenizer and packed
into sequences of `seq_len` tokens (EOS between documents), so the same inputs give the same
tokens, and the tokens' hash is the plan's data fingerprint.

Probes:
- general: next-token loss (or KL to the teacher) on packed natural text;
- recall: an item of real text holds something to retrieve, and the sequence ends asking for it
  again. Two kinds, each at several depths: `span` (a span of other text is placed at depth δ
  and repeated at the end; predicting the repeat needs the earlier copy) and `passkey` (a
  five-digit pass key placed at depth δ, asked for at the end). Each item lists the positions
  whose next token is the recalled one, and where in the context that token sits, so the same
  item serves retrieval-head scoring (where does each head look?) and recall accuracy.

Shape legend: N sequences, T tokens.
"""
import gzip
import hashlib
import json
import lzma
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from salaconvert.errors import InputError

DEFAULT_DATA = "pydoc_data.topics"
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
MIN_SEQ_LEN = 48


def read_documents(paths: list[str | Path] | None = None) -> tuple[list[str], str]:
    """The documents of `paths` (or Python's own prose when none) and a short description."""
    if not paths:
        import pydoc_data.topics

        topics = pydoc_data.topics.topics
        return [topics[k] for k in sorted(topics)], DEFAULT_DATA
    docs: list[str] = []
    for path in map(Path, paths):
        docs.extend(_read_file(path))
    if not docs:
        raise InputError(f"--data {', '.join(map(str, paths))}: no text found")
    return docs, ", ".join(map(str, paths))


def _read_file(path: Path) -> list[str]:
    if not path.is_file():
        raise InputError(f"--data {path}: no such file")
    suffixes = [s.lower() for s in path.suffixes]
    compressed = suffixes[-1] if suffixes and suffixes[-1] in (".gz", ".xz") else None
    kind = suffixes[-2] if compressed and len(suffixes) >= 2 else (suffixes[-1] if suffixes else "")
    if kind not in (".txt", ".jsonl"):
        raise InputError(f"--data {path}: expected .txt or .jsonl (optionally .gz or .xz)")
    opener = {".gz": gzip.open, ".xz": lzma.open, None: open}[compressed]
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            if kind == ".txt":
                return [t for t in f.read().split("\n\n\n") if t.strip()] or []
            docs = []
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise InputError(f"--data {path}: line {n} has no string field 'text'")
                docs.append(record["text"])
            return docs
    except (OSError, EOFError, lzma.LZMAError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"--data {path}: cannot read it ({type(e).__name__}: {str(e)[:120]})") from None


@dataclass
class Calibration:
    """Packed token sequences of real text, for the general probe and for building recall items."""
    ids_NT: torch.Tensor
    source: str
    fingerprint: str
    spare: list[int] = field(default_factory=list)  # more tokens of the same text, for recall haystacks


def support_len(config, requested: int) -> int:
    """The probe length: what was asked, capped by the positions the model supports."""
    limit = getattr(config, "max_position_embeddings", None) or requested
    seq_len = min(requested, int(limit))
    if seq_len < MIN_SEQ_LEN:
        raise InputError(f"--seq-len {requested}: the model supports {limit} positions; probes need at least {MIN_SEQ_LEN}")
    return seq_len


def build_calibration(tokenizer, docs: list[str], source: str, seq_len: int, num_seqs: int, seed: int,
                      spare_tokens: int = 0) -> Calibration:
    """`num_seqs` sequences of `seq_len` tokens packed from seeded-shuffled documents, plus spare tokens."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    eos = tokenizer.eos_token_id
    need = seq_len * num_seqs + spare_tokens
    stream: list[int] = []
    for i in order:
        stream.extend(tokenizer(docs[i], add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
        if len(stream) >= need:
            break
    if len(stream) < seq_len * num_seqs + min(spare_tokens, seq_len):
        raise InputError(f"data {source}: {len(stream)} tokens, need at least "
                         f"{seq_len * num_seqs + min(spare_tokens, seq_len)} for the probes")
    ids = torch.tensor(stream[: seq_len * num_seqs]).view(num_seqs, seq_len)
    spare = stream[seq_len * num_seqs: need]
    h = hashlib.sha256(f"{seq_len}:{num_seqs}:".encode())
    h.update(ids.numpy().astype("int64").tobytes())
    h.update(torch.tensor(spare, dtype=torch.int64).numpy().tobytes())
    return Calibration(ids, source, h.hexdigest()[:16], spare)


@dataclass
class RecallItem:
    ids_T: torch.Tensor
    query_pos: list[int]  # positions whose next token must be recalled
    source_pos: list[int]  # where that token sits earlier in the context
    kind: str
    depth: float


def recall_items(tokenizer, cal: Calibration, seq_len: int, seed: int, depths=DEPTHS,
                 kinds=("span", "passkey"), span_len: int = 16) -> list[RecallItem]:
    """One item per kind and depth, each exactly `seq_len` tokens of the calibration text's haystack."""
    rng = random.Random(seed + 1)
    hay = cal.spare if len(cal.spare) >= seq_len else cal.ids_NT.reshape(-1).tolist()
    items = []
    for kind in kinds:
        for depth in depths:
            offset = rng.randrange(0, max(1, len(hay) - 2 * seq_len))
            if kind == "span":
                needle, answer_prefix, key = _span_needle(cal, rng, span_len)
            else:
                needle, answer_prefix, key = _passkey_needle(tokenizer, rng)
            items.append(_place(hay[offset:], needle, answer_prefix, key, seq_len, depth, kind))
    return items


def _span_needle(cal: Calibration, rng: random.Random, span_len: int):
    # A span from the packed sequences (other text than the haystack); its first token cues the repeat.
    flat = cal.ids_NT.reshape(-1).tolist()
    start = rng.randrange(0, len(flat) - span_len)
    span = flat[start: start + span_len]
    return span, span[:1], span[1:]


def _passkey_needle(tokenizer, rng: random.Random):
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    key = enc(f" {rng.randrange(10000, 100000)}")
    needle = enc(" The pass key is") + key + enc(". Remember it. ")
    return needle, enc(" What is the pass key? The pass key is"), key


def _place(hay: list[int], needle: list[int], answer_prefix: list[int], key: list[int], seq_len: int,
           depth: float, kind: str) -> RecallItem:
    """haystack[:a] + needle + haystack[a:b] + answer_prefix + key, exactly seq_len tokens."""
    tail = answer_prefix + key
    room = seq_len - len(needle) - len(tail)
    if room < 8:
        raise InputError(f"probe length {seq_len} is too short for a {kind} probe of {len(needle) + len(tail)} tokens")
    at = int(room * depth)
    ids = hay[:at] + needle + hay[at:room] + tail
    key_in_needle = at + _find(needle, key)
    answer_start = seq_len - len(key)
    query = [answer_start - 1 + j for j in range(len(key))]
    source = [key_in_needle + j for j in range(len(key))]
    assert len(ids) == seq_len and all(ids[q + 1] == ids[s] for q, s in zip(query, source))
    return RecallItem(torch.tensor(ids), query, source, kind, depth)


def _find(seq: list[int], sub: list[int]) -> int:
    for i in range(len(seq) - len(sub) + 1):
        if seq[i: i + len(sub)] == sub:
            return i
    raise AssertionError("key not in needle")


def recall_batch(items: list[RecallItem]) -> torch.Tensor:
    return torch.stack([it.ids_T for it in items])
