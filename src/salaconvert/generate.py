"""`salaconvert generate` as a library function: greedy or sampled continuation of a prompt."""
import time

import torch

from salaconvert.io.load import load_model, load_tokenizer, resolve_source


def load_for_generation(model: str, dtype: str = "auto"):
    source = resolve_source(model)
    return load_model(source, dtype), load_tokenizer(source)


@torch.inference_mode()
def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 48, temperature: float = 0.0,
                  chat: bool = False, seed: int = 0) -> dict:
    """The continuation of `prompt` (only the new text) and how fast it came."""
    if chat and tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    enc = tokenizer(prompt, return_tensors="pt").to(model.device)
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    t0 = time.perf_counter()
    ids = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                         **sampling)
    seconds = time.perf_counter() - t0
    new = ids[0, enc["input_ids"].shape[1]:]
    return {"text": tokenizer.decode(new, skip_special_tokens=True), "new_tokens": int(new.numel()), "seconds": seconds}
