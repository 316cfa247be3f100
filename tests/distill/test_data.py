"""Data: every format reads the same documents; the held-out split is by document and fixed; batches are deterministic."""
import gzip
import json
import lzma

import pytest
import torch

from salaconvert.distill.data import Batches, pack, read_documents, split_documents, tokenize
from salaconvert.errors import InputError
from tiny import tiny_tokenizer

TEXTS = [f"Document number {i}. " + "Some words follow here. " * (1 + i % 4) for i in range(30)]


def _jsonl(texts):
    return "".join(json.dumps({"text": t, "source": "x"}) + "\n" for t in texts)


@pytest.mark.parametrize("name, write", [
    ("d.jsonl", lambda p: p.write_text(_jsonl(TEXTS))),
    ("d.jsonl.gz", lambda p: p.write_bytes(gzip.compress(_jsonl(TEXTS).encode()))),
    ("d.jsonl.xz", lambda p: p.write_bytes(lzma.compress(_jsonl(TEXTS).encode()))),
    ("d.txt", lambda p: p.write_text("\n\n".join(TEXTS))),
    ("d.txt.xz", lambda p: p.write_bytes(lzma.compress("\n\n".join(TEXTS).encode()))),
])
def test_text_formats_give_the_same_documents(tmp_path, name, write):
    write(tmp_path / name)
    docs = read_documents([tmp_path / name])
    assert [d.text for d in docs] == TEXTS


def test_parquet_and_hf_dataset_on_disk(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"text": TEXTS, "n": list(range(len(TEXTS)))})
    pq.write_table(table, tmp_path / "d.parquet")
    assert [d.text for d in read_documents([tmp_path / "d.parquet"])] == TEXTS
    try:
        import datasets
        datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(tmp_path / "hf"))
    except ImportError:  # the layout save_to_disk writes: state.json + Arrow stream files
        (tmp_path / "hf").mkdir()
        with pa.OSFile(str(tmp_path / "hf" / "data-00000-of-00001.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
        (tmp_path / "hf" / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    assert [d.text for d in read_documents([tmp_path / "hf"])] == TEXTS


def test_bad_inputs_are_one_line_errors(tmp_path):
    (tmp_path / "a.csv").write_text("x")
    (tmp_path / "b.jsonl").write_text('{"body": "no text field"}\n')
    for path, words in [(tmp_path / "a.csv", "unsupported format"), (tmp_path / "b.jsonl", "no field 'text'"),
                        (tmp_path / "missing.txt", "no such file")]:
        with pytest.raises(InputError, match=words):
            read_documents([path])


def test_heldout_split_is_by_document_fixed_and_independent_of_order(tmp_path):
    (tmp_path / "a.jsonl").write_text(_jsonl(TEXTS[:15]))
    (tmp_path / "b.jsonl").write_text(_jsonl(TEXTS[15:]))
    forward = split_documents(read_documents([tmp_path / "a.jsonl", tmp_path / "b.jsonl"]), 0.2)
    backward = split_documents(read_documents([tmp_path / "b.jsonl", tmp_path / "a.jsonl"]), 0.2)
    train, held = ([d.text for d in part] for part in forward)
    assert held and train and not set(train) & set(held) and len(train) + len(held) == len(TEXTS)
    assert (train, held) == tuple([d.text for d in part] for part in backward)


def test_packing_and_batches_are_deterministic_and_cover_every_sequence():
    docs, _ = split_documents(read_documents_from(TEXTS), 0.0)
    stream = tokenize(docs, tiny_tokenizer())
    assert stream.numel() == sum(len(t) + 1 for t in TEXTS)  # character tokens + one EOS per document
    assert pack(stream, 16).shape == (stream.numel() // 16, 16)
    packed = torch.arange(40 * 3).view(40, 3)  # 40 distinct rows
    a, b = Batches(packed, 4, seed=1), Batches(packed, 4, seed=1)
    epoch = torch.cat([a.batch(k) for k in range(10)])
    assert torch.equal(epoch, torch.cat([b.batch(k) for k in range(10)]))  # same seed, same order
    assert sorted(epoch[:, 0].tolist()) == list(range(0, 120, 3))  # one epoch sees every row once
    assert not torch.equal(a.batch(10), a.batch(0))  # the next epoch is reshuffled
    assert not torch.equal(Batches(packed, 4, seed=2).batch(0), a.batch(0))
    # one process's share of the global batch is exactly its rows of the single-process batch
    assert torch.equal(torch.cat([a.batch(3, rank=0, world=2), a.batch(3, rank=1, world=2)]), a.batch(3))


def read_documents_from(texts):
    from salaconvert.distill.data import Document

    return [Document(t, f"mem:{i}") for i, t in enumerate(texts)]
