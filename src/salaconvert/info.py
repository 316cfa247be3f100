"""`salaconvert info` as a library function: read a checkpoint's config and sidecar, not its weights."""
import json
from pathlib import Path

from salaconvert.errors import InputError
from salaconvert.io.checkpoint import read_sidecar


def checkpoint_info(folder: str | Path) -> dict:
    folder = Path(folder)
    config_path = folder / "config.json"
    if not folder.is_dir():
        raise InputError(f"{folder}: no such directory")
    if not config_path.is_file():
        raise InputError(f"{folder}: no config.json, so it is not a checkpoint")
    from salaconvert.io.load import load_config, resolve_source
    from salaconvert.models import SalaHybridConfig

    raw = json.loads(config_path.read_text())
    if raw.get("model_type") != SalaHybridConfig.model_type:
        raise InputError(f"{folder}: model_type is {raw.get('model_type')!r}, not a salaconvert hybrid")
    config = load_config(resolve_source(str(folder)))
    sidecar = read_sidecar(folder)
    stages = sidecar.get("distillation", {}).get("stages_done", [])
    cache = config.cache_bytes_per_token(2)
    return {
        "source": sidecar.get("source", {}),
        "architecture": config.teacher.get("model_type", "?"),
        "layer_types": config.layer_types,
        "counts": {t: config.layer_types.count(t) for t in ("sparse_attention", "linear_attention", "full_attention")},
        "plan_method": sidecar.get("plan", {}).get("method"),
        "weight_bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors")),
        "cache_bytes_per_token": {"teacher": cache["teacher_per_token"], "hybrid": cache["hybrid_per_token"]},
        "linear_state_bytes": cache["hybrid_fixed"],
        "distillation": ", ".join(f"stage {s}" for s in stages) if stages else "none (converted only)",
        "version": sidecar.get("salaconvert_version"),
        "sparse": config.sparse,
        "lightning": config.lightning,
    }
