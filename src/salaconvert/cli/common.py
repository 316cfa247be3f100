"""What every verb shares: the consoles, the one-line error exit, progress for long steps."""
import contextlib
import functools
import logging
import os
from enum import Enum

import typer
from rich.console import Console

from salaconvert.units import human_bytes, human_count  # noqa: F401  (re-exported for the verbs)

err = Console(stderr=True)  # tables, progress and messages
out = Console()  # data: generated text, --json output

class DType(str, Enum):
    """Weight dtype choices of the verbs that load a model."""

    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class KVCache(str, Enum):
    """Storage of a hybrid's sparse-layer K/V (salaconvert.models.cache.KV_DTYPES)."""

    auto = "auto"
    fp8 = "fp8"


KV_CACHE_HELP = ("A hybrid's sparse-layer K/V storage: auto (the model's dtype) or fp8 (e4m3, half the bytes; "
                 "attention reads the rounded values).")

MODEL_HELP = ("a local Hugging Face directory, a hub id in the local cache, a .gguf file, "
              "or the built-in 'smollm2-135m'")


@contextlib.contextmanager
def user_errors():
    """Bad input ends the command with one line on stderr and exit code 2."""
    from salaconvert.errors import InputError

    try:
        yield
    except InputError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


@contextlib.contextmanager
def steps(title: str):
    """A spinner whose text follows the current step; yields the function that moves it on."""
    quiet_transformers()
    with err.status(title) as status:
        yield lambda what: status.update(f"{title}: {what}")


def quiet_transformers() -> None:
    """Our own progress replaces transformers' bars and warnings on the terminal."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    # The GGUF loader calls tqdm directly, ignoring the switch above (and tqdm was imported, with
    # its environment defaults, before any verb ran): give that module a silent tqdm.
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    if not isinstance(gguf_utils.tqdm, functools.partial):
        gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)
