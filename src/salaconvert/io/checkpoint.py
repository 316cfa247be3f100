"""Write a hybrid checkpoint (SPEC §3) atomically: everything goes to a temporary sibling
directory, which is renamed onto the target only once complete. An error or Ctrl-C midway
removes the temporary directory, so the target path never holds a half-written checkpoint.
"""
import json
import os
import shutil
import time
from pathlib import Path

from salaconvert.errors import InputError

SIDECAR = "salaconvert.json"
INDEX = "model.safetensors.index.json"
# With these two files in the checkpoint, `trust_remote_code=True` loads it with salaconvert
# installed but not imported; after `import salaconvert` the Auto classes know it directly.
REMOTE_CODE = {
    "configuration_sala_hybrid.py": "from salaconvert.models.configuration import SalaHybridConfig  # noqa: F401\n",
    "modeling_sala_hybrid.py": "from salaconvert.models.modeling import SalaHybridForCausalLM  # noqa: F401\n",
}
AUTO_MAP = {
    "AutoConfig": "configuration_sala_hybrid.SalaHybridConfig",
    "AutoModelForCausalLM": "modeling_sala_hybrid.SalaHybridForCausalLM",
}


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Fail early, before any heavy work, if `out` may not be written."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"{out}: already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory")
    if not out.parent.exists():
        raise InputError(f"{out.parent}: parent directory does not exist")
    return out


def write_atomically(out: str | Path, fill, overwrite: bool = False) -> Path:
    """Call `fill(tmp_dir)` to write the contents, then move them to `out` in one rename."""
    out = check_output_dir(out, overwrite)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{int(time.time() * 1000)}"
    tmp.mkdir()
    try:
        fill(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_checkpoint(model, tokenizer, out: str | Path, sidecar: dict, overwrite: bool = False,
                    max_shard_size: str = "2GB", extra=None) -> Path:
    """The hybrid `model` with its tokenizer and `salaconvert.json` sidecar, written atomically to `out`.

    `extra(tmp_dir)`, if given, adds files of its own before the directory is moved into place.
    """

    def fill(tmp: Path) -> None:
        model.config.auto_map = dict(AUTO_MAP)
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        _ensure_index(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in REMOTE_CODE.items():
            (tmp / name).write_text(text)
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2, default=str) + "\n")
        if extra is not None:
            extra(tmp)

    return write_atomically(out, fill, overwrite)


def _ensure_index(folder: Path) -> None:
    """Always shard: a single `model.safetensors` becomes shard 1 of 1 with an index, as large models have."""
    single = folder / "model.safetensors"
    if (folder / INDEX).exists() or not single.exists():
        return
    from safetensors import safe_open

    shard = "model-00001-of-00001.safetensors"
    with safe_open(single, "pt") as f:
        names = list(f.keys())
    single.rename(folder / shard)
    size = (folder / shard).stat().st_size
    index = {"metadata": {"total_size": size}, "weight_map": {n: shard for n in sorted(names)}}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def read_sidecar(folder: str | Path) -> dict:
    path = Path(folder) / SIDECAR
    return json.loads(path.read_text()) if path.is_file() else {}
