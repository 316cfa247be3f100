"""What every verb shares: the consoles, the one-line error exit, progress for long steps."""
import contextlib
import logging
import os

import typer
from rich.console import Console

# Set before transformers (and its tqdm) is imported by any verb: the GGUF loader's bar ignores
# transformers' own switch. The CLI shows its own progress instead.
os.environ.setdefault("TQDM_DISABLE", "1")

err = Console(stderr=True)  # tables, progress and messages
out = Console()  # data: generated text, --json output

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


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000 or unit == "B":
            return f"{n:.0f}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}B"
