"""`salaconvert generate DIR PROMPT`"""
from typing import Annotated

import typer
from rich.panel import Panel

from salaconvert.cli.common import KV_CACHE_HELP, MODEL_HELP, KVCache, err, out, steps, user_errors


def generate(
    model: Annotated[str, typer.Argument(help=f"A hybrid checkpoint directory, or any {MODEL_HELP}.", show_default=False)],
    prompt: Annotated[str, typer.Argument(help="The text to continue.", show_default=False)],
    teacher: Annotated[str | None, typer.Option(help="Also continue the prompt with this teacher model, for comparison.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate.")] = 48,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 means greedy decoding.")] = 0.0,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the tokenizer's chat template.")] = False,
    seed: Annotated[int, typer.Option(help="Random seed for sampling.")] = 0,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1... (default: cuda when available).", show_default=False)] = None,
    kv_cache: Annotated[KVCache, typer.Option(help=KV_CACHE_HELP + " Greedy decoding only.")] = KVCache.auto,
):
    """Continue PROMPT with a checkpoint (and optionally its teacher, side by side)."""
    from salaconvert.generate import generate_text, load_for_generation
    from salaconvert.models.cache import KV_DTYPES

    runs = [("teacher", teacher), ("model", model)] if teacher else [("model", model)]
    with user_errors():
        for label, spec in runs:
            with steps(f"generate with {spec}") as step:
                step("loading")
                m, tok = load_for_generation(spec, device=device)
                step("generating")
                kv_dtype = KV_DTYPES[kv_cache.value] if label == "model" else None
                result = generate_text(m, tok, prompt, max_new_tokens, temperature, chat, seed, kv_dtype=kv_dtype)
            rate = result["new_tokens"] / max(result["seconds"], 1e-9)
            if len(runs) == 1:
                out.print(result["text"], highlight=False, markup=False)
            else:
                err.print(Panel(result["text"], title=f"{label}: {spec}", subtitle=f"{rate:.1f} tokens/s", title_align="left"),
                          highlight=False, markup=False)
            err.print(f"[dim]{result['new_tokens']} tokens in {result['seconds']:.1f}s ({rate:.1f} tokens/s, "
                      f"{result['decode']})[/]")
