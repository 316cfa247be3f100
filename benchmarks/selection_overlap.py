"""How much neighbouring tokens' InfLLM-V2 block choices overlap: a real model on real text vs random q, k.

The stage-2 kernel walks, per tile of consecutive tokens, the union of their block lists, so its
cost depends on that overlap (benchmarks/notes-infllmv2.md); the kernel benchmark feeds random
q and k, whose choices are independent. This measures the same statistics on SmolLM2-135M's own
attention projections (the weights a converted sparse layer starts from, without RoPE as the
sparse layer runs them) over Jane Austen, and on random inputs of the same shapes.

For the last --queries tokens of a --tokens-long text, per sparse layer (those of the 1:3 plan
that the forward reaches) and KV head, with the default selection (block 64, 96 blocks: init 1 +
local 32 + 63 chosen):
  adjacent_overlap   |chosen(t) ∩ chosen(t+1)| / |chosen(t)|, chosen = selected minus forced
  union_per_tile_N   blocks a tile of N consecutive tokens walks (union of their lists) / 96

    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/selection_overlap.py --out benchmarks/results  # CPU, ~2 min
"""
import argparse
import json
import time
from pathlib import Path

import torch

from salaconvert.kernels.infllmv2.naive import naive_infllmv2_select

SELECT = dict(block_size=64, topk=96, init_blocks=1, local_blocks=32, kernel_size=32, stride=16)
TILES = (4, 16)


class _Enough(Exception):
    pass


def real_qk(tokens: int, data: list[str], layers: list[int], model: str = "smollm2-135m",
            device: str = "cpu", dtype: str = "float32"):
    """{layer: (q [1, T, Hq, d], k [1, T, Hkv, d])} from the model's projections (no RoPE) on the
    first `tokens` tokens of the `data` files (one after another, documents joined by EOS)."""
    from salaconvert.distill.data import read_documents, tokenize
    from salaconvert.io.load import load_model, load_tokenizer, resolve_source
    from salaconvert.models.prefill_attention import chunk_causal_attention

    source = resolve_source(model)
    model, tok = load_model(source, dtype, device), load_tokenizer(source)
    ids = tokenize(read_documents(data, "text"), tok, max_tokens=tokens)
    if len(ids) < tokens:
        raise SystemExit(f"{tokens} tokens wanted, the data holds {len(ids)}")
    ids = ids[:tokens].to(device)[None]
    blocks = model.model.layers
    d = model.config.head_dim
    got, hooks = {}, []
    for i in layers:
        attn = blocks[i].self_attn
        hooks.append(attn.q_proj.register_forward_hook(lambda m, a, o, i=i: got.setdefault(i, {}).update(q=o.view(1, tokens, -1, d))))
        hooks.append(attn.k_proj.register_forward_hook(lambda m, a, o, i=i: got.setdefault(i, {}).update(k=o.view(1, tokens, -1, d))))

    def stop(*_):
        raise _Enough

    hooks.append(blocks[max(layers)].self_attn.register_forward_hook(stop))
    try:
        with torch.no_grad(), chunk_causal_attention(model):  # flash, no [T, T] mask
            model.model(input_ids=ids, use_cache=False)
    except _Enough:
        pass
    for h in hooks:
        h.remove()
    return {i: (got[i]["q"], got[i]["k"]) for i in layers}


def overlap_stats(q, k, queries: int) -> dict:
    """The statistics above for the last `queries` query rows of q against all of k, per KV head."""
    T = k.shape[1]
    idx = naive_infllmv2_select(q[:, T - queries:], k, **SELECT)[0]  # [Q, Hkv, 96], -1 padded
    pos = torch.arange(T - queries, T)
    qb = pos // SELECT["block_size"]
    stats = []
    for h in range(idx.shape[1]):
        sets = [set(row.tolist()) - {-1} for row in idx[:, h]]
        forced = [set(range(SELECT["init_blocks"])) | set(range(int(b) - SELECT["local_blocks"] + 1, int(b) + 1)) for b in qb]
        chosen = [s - f for s, f in zip(sets, forced)]
        adjacent = [len(a & b) / max(1, len(a)) for a, b in zip(chosen[:-1], chosen[1:])]
        row = {"adjacent_overlap": sum(adjacent) / len(adjacent)}
        for n in TILES:
            unions = [len(set().union(*sets[i:i + n])) for i in range(0, queries - n + 1, n)]
            row[f"union_per_tile_{n}"] = sum(unions) / len(unions) / SELECT["topk"]
        stats.append(row)
    return {key: sum(s[key] for s in stats) / len(stats) for key in stats[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--queries", type=int, default=1024)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/corpus/austen.jsonl.xz"))
    ap.add_argument("--layers", default="0,4,9", help="sparse layers of the 1:3 plan to measure (the forward stops after the last)")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    layers = [int(x) for x in args.layers.split(",")]
    rows = []
    for layer, (q, k) in real_qk(args.tokens, [args.data], layers).items():
        rows.append({"inputs": f"smollm2-135m layer {layer}", **overlap_stats(q, k, args.queries)})
        print(json.dumps(rows[-1]), flush=True)
    rows.append({"inputs": "random normal", **overlap_stats(torch.randn_like(q), torch.randn_like(k), args.queries)})
    print(json.dumps(rows[-1]), flush=True)
    report = {"what": __doc__.splitlines()[0], "tokens": args.tokens, "queries": args.queries, "select": SELECT,
              "data": Path(args.data).name, "shapes": {"Hq": q.shape[2], "Hkv": k.shape[2], "d": q.shape[3]},
              "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "selection_overlap_cpu.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
