"""`salaconvert generate` as a library function: greedy or sampled continuation of a prompt.

Greedy decoding on a GPU replays a CUDA graph of the model's one-token step (models.graph_decode)
on a cache reserved for prompt + new tokens: an eager step of a small model is launch-bound (the
H100 bench measured 28–55 ms a token for SmolLM2's hybrid eagerly, 4.2–4.5 ms with graphs).
Sampling, CPUs and teachers whose cache cannot be reserved use transformers' `generate`.
"""
import time

import torch

from salaconvert.errors import InputError
from salaconvert.eval.forward import prefill
from salaconvert.eval.run import default_device, default_dtype
from salaconvert.io.load import load_model, load_tokenizer, resolve_source
from salaconvert.models.cache import reserved_cache
from salaconvert.models.graph_decode import GraphDecoder


def load_for_generation(model: str, dtype: str = "auto", device: str | None = None):
    """(model, tokenizer): on the GPU when there is one, in bf16 there and fp32 on the CPU unless `dtype` says."""
    source = resolve_source(model)
    device = default_device(device)
    return load_model(source, default_dtype(dtype, device), device), load_tokenizer(source)


@torch.inference_mode()
def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 48, temperature: float = 0.0,
                  chat: bool = False, seed: int = 0, graph_decode: bool | None = None, kv_dtype=None) -> dict:
    """The continuation of `prompt` (only the new text) and how fast it came.

    `graph_decode`: greedy decoding through `GraphDecoder` (None: on CUDA devices, or with an fp8
    cache; on a CPU it runs the same step eagerly, which is how the tests compare it with
    transformers' `generate`). `kv_dtype=models.cache.FP8`: a hybrid's sparse layers keep K/V in
    fp8 (greedy decoding only).
    """
    if chat and tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    enc = tokenizer(prompt, return_tensors="pt").to(model.device)
    torch.manual_seed(seed)
    if kv_dtype is not None and temperature > 0:
        raise InputError("--kv-cache fp8 takes greedy decoding (--temperature 0)")
    if graph_decode is None:  # the reserved cache (the only one an fp8 K/V can live in) on a CPU too
        graph_decode = model.device.type == "cuda" or kv_dtype is not None
    use_graph = temperature == 0 and graph_decode
    t0 = time.perf_counter()
    new = _graph_greedy(model, enc["input_ids"][0], max_new_tokens, kv_dtype) if use_graph else None
    how = "cuda graph" if model.device.type == "cuda" else "decoder step, eager"
    if new is None:
        how = "transformers"
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        ids = model.generate(**enc, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling)
        new = ids[0, enc["input_ids"].shape[1]:].tolist()
    seconds = time.perf_counter() - t0
    return {"text": tokenizer.decode(new, skip_special_tokens=True), "new_tokens": len(new), "seconds": seconds,
            "decode": how}


def _graph_greedy(model, ids_T: torch.Tensor, max_new_tokens: int, kv_dtype=None) -> list[int] | None:
    """Greedy new token ids, stopping after an end-of-sequence token as `generate` does; None when
    the model's cache cannot be reserved (the caller falls back to `generate`)."""
    try:
        cache = reserved_cache(model, ids_T.numel() + max_new_tokens, kv_dtype)
    except ValueError as e:
        if kv_dtype is not None:
            raise InputError(f"--kv-cache fp8: {e}") from None
        return None
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    logits, cache = prefill(model, ids_T, cache=cache)
    decoder = GraphDecoder(model, cache)
    new = []
    try:
        while True:
            token = int(logits.argmax())
            new.append(token)
            if token in eos or len(new) == max_new_tokens:
                return new
            logits = decoder.step(token)[0]
    finally:
        decoder.close()
