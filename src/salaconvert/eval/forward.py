"""Chunked prefill, greedy decode and token losses for any causal LM with the HF interface.

Long inputs go through the model in chunks that share one cache (the model makes it on the first
call: a DynamicCache for a teacher, the hybrid cache for a hybrid), so memory for logits and
activations is that of one chunk, never of the whole input. For the hybrid, chunked prefill is
also what a long-context user runs: the Lightning state and the sparse K/V carry from chunk to chunk.

Shape legend: T tokens, C chunk length, V vocabulary.
"""
import torch
import torch.nn.functional as F

from salaconvert.models.cache import cache_argument
from salaconvert.models.decoder_glue import fused_decoder_glue
from salaconvert.models.prefill_attention import chunk_causal_attention

DEFAULT_CHUNK = 4096


def _device(model) -> torch.device:
    return getattr(model, "device", None) or next(model.parameters()).device


@torch.inference_mode()
def prefill(model, ids_T: list[int] | torch.Tensor, chunk: int = DEFAULT_CHUNK, cache=None, on_logits=None):
    """Run `ids_T` through `model` in chunks; returns (last-position logits [V], cache).

    `on_logits(start, logits_CV)`, if given, receives every chunk's full logits (float32) with the
    position of the chunk's first token; otherwise only the last position's logits are computed.
    """
    ids = torch.as_tensor(ids_T, dtype=torch.long, device=_device(model)).view(1, -1)
    last = None
    # one unpadded sequence: causal SDPA with no materialised mask; norms and MLP products fused
    with chunk_causal_attention(model), fused_decoder_glue(model):
        for start in range(0, ids.shape[1], chunk):
            piece = ids[:, start:start + chunk]
            keep = {} if on_logits is not None else {"logits_to_keep": 1}
            out = model(input_ids=piece, use_cache=True, **{cache_argument(model): cache}, **keep)
            cache = out.past_key_values
            logits = out.logits[0].float()
            if on_logits is not None:
                on_logits(start, logits)
            last = logits[-1]
    return last, cache


@torch.inference_mode()
def decode_step(model, token: int, cache):
    """One decode step; returns (logits [V], cache)."""
    ids = torch.tensor([[token]], dtype=torch.long, device=_device(model))
    with fused_decoder_glue(model):
        out = model(input_ids=ids, use_cache=True, **{cache_argument(model): cache})
    return out.logits[0, -1].float(), out.past_key_values


@torch.inference_mode()
def greedy(model, ids_T, max_new_tokens: int, chunk: int = DEFAULT_CHUNK) -> list[int]:
    """Greedy continuation of `ids_T`: the `max_new_tokens` new token ids."""
    logits, cache = prefill(model, ids_T, chunk)
    new = []
    for i in range(max_new_tokens):
        token = int(logits.argmax())
        new.append(token)
        if i + 1 < max_new_tokens:
            logits, cache = decode_step(model, token, cache)
    return new


@torch.inference_mode()
def token_nll(model, ids_T, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Negative log-likelihood of each of ids_T[1:] given the tokens before it: float64 [T−1].

    Chunk k's logits predict its own tokens 1.. and the first token of chunk k+1.
    """
    ids = torch.as_tensor(ids_T, dtype=torch.long).view(-1)
    T = ids.numel()
    nll = torch.full((T - 1,), float("nan"), dtype=torch.float64)  # poison: unwritten entries show

    def take(start: int, logits_CV: torch.Tensor) -> None:
        C = logits_CV.shape[0]
        stop = min(start + C, T - 1)  # the last token of the window predicts nothing we know
        if stop <= start:
            return
        targets = ids[start + 1: stop + 1].to(logits_CV.device)
        logp = F.log_softmax(logits_CV[: stop - start], dim=-1)
        nll[start:stop] = -logp.gather(1, targets[:, None])[:, 0].double().cpu()

    prefill(model, ids, chunk, on_logits=take)
    return nll


def cache_nbytes(cache) -> int:
    """Bytes held by the tensors of a cache (K/V, recurrent states, compressed keys...), each storage once."""
    seen, total = set(), 0

    def walk(obj, depth=0):
        nonlocal total
        if isinstance(obj, torch.Tensor):
            if obj.numel() and obj.data_ptr() not in seen:
                seen.add(obj.data_ptr())
                total += obj.numel() * obj.element_size()
        elif depth < 4 and isinstance(obj, (list, tuple)):
            for x in obj:
                walk(x, depth + 1)
        elif depth < 4 and isinstance(obj, dict):
            for x in obj.values():
                walk(x, depth + 1)
        elif depth < 2 and hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
            for x in vars(obj).values():
                walk(x, depth + 1)

    walk(getattr(cache, "layers", cache))
    return total
