"""Perplexity at a context length: exp of the mean token loss over windows of that many tokens.

For length L the first `tokens` ids of the held-out stream are cut into consecutive windows of L
(at least one); every token of a window but the first is predicted from the ones before it in
that window only. The same text serves every length, so the numbers differ only by context.
`ppl_last_quarter` uses the losses of each window's last quarter: the tokens with the longest
context, where long-context ability shows (or its loss does).
"""
import math

import torch

from salaconvert.eval.forward import DEFAULT_CHUNK, token_nll


def windows(stream: list[int], length: int, tokens: int) -> list[list[int]]:
    n = max(1, tokens // length)
    return [stream[i * length:(i + 1) * length] for i in range(n) if len(stream) >= (i + 1) * length]


def perplexity(model, stream: list[int], length: int, tokens: int, chunk: int = DEFAULT_CHUNK) -> dict:
    """Perplexity of `model` at context `length` on `stream` (see the module docstring)."""
    all_nll, tail = [], []
    for window in windows(stream, length, tokens):
        nll = token_nll(model, window, chunk)
        all_nll.append(nll)
        tail.append(nll[-max(1, nll.numel() // 4):])
    nll = torch.cat(all_nll)
    tail_nll = torch.cat(tail)
    return {
        "ppl": math.exp(nll.mean().item()),
        "ppl_last_quarter": math.exp(tail_nll.mean().item()),
        "mean_nll": nll.mean().item(),
        "predicted_tokens": int(nll.numel()),
        "windows": len(all_nll),
    }
