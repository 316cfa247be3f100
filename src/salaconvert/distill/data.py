"""Training text: read documents, split off a held-out set by document, tokenise, pack, batch.

Formats (SPEC §5): `.txt` (documents separated by a blank line), `.jsonl` (one record a line, the
text in `text_field`), `.parquet` (column `text_field`, needs pyarrow), each optionally `.gz` or
`.xz`; a directory saved by HF `datasets.save_to_disk`; or a directory of such files (recursively).

Everything is deterministic: a document is held out when the hash of its text falls below
`heldout_fraction` (so the split does not depend on file order), documents are then ordered by
that hash, tokenised with the teacher's tokenizer, joined with EOS between them and cut into
sequences of `seq_len`. Batch k of a stage is a pure function of (seed, stage, k), which is all a
resumed run needs to know about its data position.
"""
import gzip
import hashlib
import json
import lzma
from dataclasses import dataclass
from pathlib import Path

import torch

from salaconvert.errors import InputError

FORMATS = (".txt", ".jsonl", ".parquet")
COMPRESSION = {".gz": gzip.open, ".xz": lzma.open}


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # "path:index"

    @property
    def key(self) -> int:
        """A stable 64-bit hash of the text: fixes both the held-out split and the order."""
        return int.from_bytes(hashlib.sha1(self.text.encode()).digest()[:8], "big")


def read_documents(paths, text_field: str = "text") -> list[Document]:
    docs = []
    for spec in paths:
        path = Path(spec).expanduser()
        if not path.exists():
            raise InputError(f"{spec}: no such file or directory")
        if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            docs += _read_hf_dataset(path, text_field)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _format(p) is not None)
            if not files:
                raise InputError(f"{spec}: directory holds no {'/'.join(FORMATS)} files (optionally .gz/.xz)")
            for f in files:
                docs += _read_file(f, text_field)
        else:
            docs += _read_file(path, text_field)
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise InputError(f"{', '.join(map(str, paths))}: no text found")
    return docs


def _format(path: Path) -> str | None:
    suffixes = path.suffixes[-2:]
    if suffixes and suffixes[-1] in COMPRESSION:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes and suffixes[-1] in FORMATS else None


def _open_text(path: Path):
    opener = COMPRESSION.get(path.suffix, open)
    return opener(path, "rt", encoding="utf-8")


def _read_file(path: Path, text_field: str) -> list[Document]:
    kind = _format(path)
    if kind is None:
        raise InputError(f"{path}: unsupported format (expected {', '.join(FORMATS)}, optionally .gz/.xz)")
    try:
        if kind == ".txt":
            with _open_text(path) as f:
                parts = f.read().split("\n\n")
            return [Document(t, f"{path}:{i}") for i, t in enumerate(parts)]
        if kind == ".jsonl":
            docs = []
            with _open_text(path) as f:
                for i, line in enumerate(f):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if not isinstance(record, dict) or text_field not in record:
                        raise InputError(f"{path}: line {i + 1} has no field {text_field!r}")
                    docs.append(Document(str(record[text_field]), f"{path}:{i}"))
            return docs
        return _read_parquet(path, text_field)
    except (OSError, EOFError, lzma.LZMAError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read it ({str(e).splitlines()[0][:160]})") from None


def _pyarrow(what: str):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise InputError(f"{what}: reading it needs pyarrow (pip install 'salaconvert[data]')") from None
    import pyarrow.parquet
    import pyarrow.ipc

    return pyarrow


def _column(table, text_field: str, what: str) -> list[str]:
    if text_field not in table.column_names:
        raise InputError(f"{what}: no column {text_field!r} (columns: {table.column_names[:8]})")
    return [str(t) for t in table.column(text_field).to_pylist() if t is not None]


def _read_parquet(path: Path, text_field: str) -> list[Document]:
    pa = _pyarrow(str(path))
    source = COMPRESSION[path.suffix](path, "rb") if path.suffix in COMPRESSION else path
    table = pa.parquet.read_table(source, columns=[text_field] if text_field else None)
    return [Document(t, f"{path}:{i}") for i, t in enumerate(_column(table, text_field, str(path)))]


def _read_hf_dataset(path: Path, text_field: str) -> list[Document]:
    """A `save_to_disk` directory: through `datasets` when installed, else its Arrow files directly."""
    if (path / "dataset_dict.json").is_file():  # a DatasetDict: every split, in the order saved
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        return [d for s in splits for d in _read_hf_dataset(path / s, text_field)]
    try:
        from datasets import load_from_disk
    except ImportError:
        load_from_disk = None
    if load_from_disk is not None:
        ds = load_from_disk(str(path))
        if text_field not in ds.column_names:
            raise InputError(f"{path}: no column {text_field!r} (columns: {ds.column_names[:8]})")
        return [Document(str(t), f"{path}:{i}") for i, t in enumerate(ds[text_field]) if t is not None]
    pa = _pyarrow(str(path))
    state = json.loads((path / "state.json").read_text())
    texts = []
    for entry in state["_data_files"]:
        with pa.memory_map(str(path / entry["filename"])) as source:
            texts += _column(pa.ipc.open_stream(source).read_all(), text_field, str(path))
    return [Document(t, f"{path}:{i}") for i, t in enumerate(texts)]


def split_documents(docs: list[Document], heldout_fraction: float) -> tuple[list[Document], list[Document]]:
    """(train, held-out), each ordered by the documents' hash. At least one of each where possible."""
    docs = sorted(set(docs), key=lambda d: (d.key, d.source))
    if heldout_fraction <= 0 or len(docs) < 2:
        return docs, []
    cut = int(heldout_fraction * 2**64)
    heldout = [d for d in docs if d.key < cut] or docs[:1]
    if len(heldout) == len(docs):
        heldout = heldout[:1]
    held = set(heldout)
    return [d for d in docs if d not in held], heldout


def tokenize(docs: list[Document], tokenizer, max_tokens: int | None = None, batch: int = 64) -> torch.Tensor:
    """The documents' tokens as one 1-D stream, EOS after each (BOS before each if there is no EOS)."""
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    pieces, total = [], 0
    for i in range(0, len(docs), batch):
        encoded = tokenizer([d.text for d in docs[i:i + batch]], add_special_tokens=False)["input_ids"]
        for ids in encoded:
            ids = ids + [eos] if eos is not None else ([bos] if bos is not None else []) + ids
            pieces.append(torch.tensor(ids, dtype=torch.long))
            total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    stream = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    return stream[:max_tokens] if max_tokens is not None else stream


def pack(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[N, seq_len] sequences cut from the stream (the tail shorter than seq_len is dropped)."""
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)


class Batches:
    """Batches of a packed [N, T] tensor: batch k is a pure function of (seed, k), epochs reshuffled."""

    def __init__(self, packed: torch.Tensor, batch_size: int, seed: int, shuffle: bool = True):
        if packed.shape[0] == 0:
            raise InputError("not enough training text for one sequence; add data or lower seq_len")
        self.packed, self.batch_size, self.seed, self.shuffle = packed, batch_size, seed, shuffle
        self._perms = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            n = self.packed.shape[0]
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)}
        return self._perms[epoch]

    def batch(self, step: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        """This process's share ([batch_size / world, T]) of global batch `step`."""
        n, per = self.packed.shape[0], self.batch_size // world
        rows = []
        for j in range(per):
            i = step * self.batch_size + rank * per + j
            rows.append(self.packed[self._order(i // n)[i % n]])
        return torch.stack(rows)
