"""What an fp8 K/V cache costs in quality: a hybrid's next-token distributions with its sparse
layers' K/V stored in fp8 (e4m3, models.cache.FP8) against the same model with K/V in its own dtype.

The same text goes through the model twice by chunked prefill (each chunk attends to the cached
K/V of the chunks before it, as long-context use does), once per cache. Reported, over every
predicted token: perplexity with each cache, the mean KL(full || fp8) of the next-token
distributions, how often the top-1 token agrees, and the cache bytes per token of each.

    PYTHONSAFEPATH=1 .venv/bin/python benchmarks/kv_fp8_quality.py --model demo-out/smollm2-sala-distilled \\
        --data ../shared/data/corpus/austen.jsonl.xz --tokens 12288 --out benchmarks/results
"""
import argparse
import datetime
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from salaconvert.distill.data import read_documents, tokenize
from salaconvert.eval.forward import cache_nbytes, prefill
from salaconvert.io.load import load_model, load_tokenizer, resolve_source
from salaconvert.models.cache import FP8, make_hybrid_cache


def token_ids(tokenizer, data: list[str], tokens: int, skip: int) -> torch.Tensor:
    """`tokens` ids of the documents in `data` joined by EOS, after the first `skip` (held out from a demo's training)."""
    ids = tokenize(read_documents(data, "text"), tokenizer, max_tokens=skip + tokens)
    if len(ids) < skip + tokens:
        raise SystemExit(f"the data holds {len(ids)} tokens, {skip + tokens} wanted")
    return ids[skip:skip + tokens]


def logprobs(model, ids: torch.Tensor, chunk: int, kv_dtype) -> tuple[torch.Tensor, int]:
    """Next-token log-probabilities [T − 1, V] (float32, on the CPU) and the cache's bytes."""
    rows = []
    cache = make_hybrid_cache(model.config, kv_dtype=kv_dtype)
    _, cache = prefill(model, ids, chunk, cache=cache,
                       on_logits=lambda start, logits: rows.append(F.log_softmax(logits, -1).cpu()))
    return torch.cat(rows)[:-1], cache_nbytes(cache)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a hybrid checkpoint directory")
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--tokens", type=int, default=12288)
    ap.add_argument("--skip", type=int, default=200_000, help="tokens of the data skipped first (held out)")
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    source = resolve_source(args.model)
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    model, tok = load_model(source, dtype, args.device), load_tokenizer(source)
    if getattr(model.config, "model_type", None) != "sala_hybrid":
        raise SystemExit(f"{args.model}: not a salaconvert hybrid")
    ids = token_ids(tok, args.data, args.tokens, args.skip)
    t0 = time.perf_counter()
    full, full_bytes = logprobs(model, ids, args.chunk, None)
    fp8, fp8_bytes = logprobs(model, ids, args.chunk, FP8)
    targets = ids[1:, None]
    nll_full = -full.gather(1, targets).double().mean().item()
    nll_fp8 = -fp8.gather(1, targets).double().mean().item()
    kl = torch.cat([(f.exp() * (f - g)).sum(-1) for f, g in zip(full.split(1024), fp8.split(1024))]).double()
    report = {
        "what": "a hybrid with its sparse K/V cached in fp8 (e4m3) vs in its own dtype, same text, chunked prefill",
        "model": args.model, "data": [Path(d).name for d in args.data], "tokens": args.tokens, "skip": args.skip,
        "chunk": args.chunk, "device": args.device, "dtype": dtype, "dense_len": model.config.sparse["dense_len"],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "ppl_full": math.exp(nll_full), "ppl_fp8": math.exp(nll_fp8),
        "kl_mean": kl.mean().item(), "kl_p99": kl.quantile(0.99).item(),
        "top1_agree": (full.argmax(-1) == fp8.argmax(-1)).double().mean().item(),
        "cache_bytes_per_token": {"full": full_bytes / args.tokens, "fp8": fp8_bytes / args.tokens},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(report, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"kv_fp8_quality_{'cpu' if args.device == 'cpu' else 'gpu'}_{Path(args.model).name}.json"
    (args.out / name).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
