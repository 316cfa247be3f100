"""`salaconvert convert` as a library function: MODEL → validated plan → hybrid → checkpoint."""
import hashlib
import json
import time
from pathlib import Path

import torch

from salaconvert import __version__
from salaconvert.errors import InputError
from salaconvert.io.checkpoint import check_output_dir, save_checkpoint
from salaconvert.io.load import ModelSource, load_config, load_model, load_tokenizer, resolve_source
from salaconvert.layer_selection.plan import LayerPlan, parse_ratio, uniform_layer_types
from salaconvert.surgery.convert import convert, teacher_arch

REPORT = "conversion_report.json"


def check_teacher(source: ModelSource):
    """Config-level checks and the architecture, on a meta-device skeleton: no weights loaded yet."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = load_config(source)
    if config.model_type == "sala_hybrid":
        raise InputError(f"{source.spec}: already a salaconvert hybrid")
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING or getattr(config, "is_encoder_decoder", False):
        raise InputError(f"{source.spec}: {config.model_type} is not a decoder-only causal LM")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return config, teacher_arch(skeleton)


def make_plan(num_layers: int, ratio: str, plan_path: str | None, first_last: bool) -> LayerPlan:
    if plan_path is not None:
        return LayerPlan.load(plan_path).validate(num_layers)
    return LayerPlan(uniform_layer_types(num_layers, ratio, first_last), method="uniform", ratio=ratio).validate(num_layers)


def convert_model(model: str, out: str | Path, ratio: str = "1:3", plan: str | None = None, first_last: bool = True,
                  dtype: str = "auto", overwrite: bool = False, sparse: dict | None = None,
                  lightning: dict | None = None, step=lambda what: None) -> dict:
    """Convert MODEL and write the hybrid checkpoint to `out`. Returns the conversion report.

    Everything that can be checked is checked before the teacher's weights are loaded; `step`
    is called with a short description as each stage starts (the CLI shows it as progress).
    """
    t0 = time.perf_counter()
    step("checking input")
    if plan is None:
        parse_ratio(ratio)
    out = check_output_dir(out, overwrite)
    source = resolve_source(model)
    config, arch = check_teacher(source)
    layer_plan = make_plan(config.num_hidden_layers, ratio, plan, first_last)
    step("loading teacher")
    teacher = load_model(source, dtype)
    tokenizer = load_tokenizer(source, required=False)
    t_load = time.perf_counter()
    step("building hybrid")
    hybrid = convert(teacher, layer_plan, lightning=lightning, sparse=sparse)
    t_convert = time.perf_counter()
    report = conversion_report(source, arch.generic, teacher, hybrid, layer_plan)
    sidecar = {
        "salaconvert_version": __version__,
        "source": {"model": source.spec, "kind": source.kind, "fingerprint": fingerprint(teacher)},
        "plan": layer_plan.to_dict(),
        "recipe": None,
        "distillation": {"stages_done": [], "note": "converted only; not distilled"},
    }
    step("writing checkpoint")

    def with_report(folder):
        report["seconds"] = {"load": t_load - t0, "convert": t_convert - t_load,
                             "save": time.perf_counter() - t_convert, "total": time.perf_counter() - t0}
        (folder / REPORT).write_text(json.dumps(report, indent=2) + "\n")

    save_checkpoint(hybrid, tokenizer, out, sidecar, overwrite=overwrite, extra=with_report)
    report["seconds"]["total"] = time.perf_counter() - t0
    report["out"] = str(out)
    return report


def unique_params(model: torch.nn.Module) -> int:
    """Parameter count with tied tensors counted once."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


def conversion_report(source, generic_arch: bool, teacher, hybrid, plan: LayerPlan) -> dict:
    cfg = hybrid.config
    dtype_bytes = torch.finfo(teacher.dtype).bits // 8
    cache = cfg.cache_bytes_per_token(dtype_bytes)
    return {
        "model": source.spec,
        "architecture": cfg.teacher["model_type"] + (" (generic detection)" if generic_arch else ""),
        "layer_types": cfg.layer_types,
        "counts": {t: cfg.layer_types.count(t) for t in ("sparse_attention", "linear_attention", "full_attention")},
        "plan_method": plan.method,
        "params": {"teacher": unique_params(teacher), "hybrid": unique_params(hybrid)},
        "dtype": str(teacher.dtype).removeprefix("torch."),
        "cache_bytes_per_token": {"teacher": cache["teacher_per_token"], "hybrid": cache["hybrid_per_token"]},
        "linear_state_bytes": cache["hybrid_fixed"],
        "distilled": False,
    }


def fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the config and a sample of every weight: changes when the weights change."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        h.update(name.encode())
        h.update(flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
