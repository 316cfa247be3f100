"""Teacher and student side by side: one copy of every frozen tensor they have in common.

The student is the hybrid; everything it did not replace (embeddings, MLPs, norms, the attention
of full layers) is numerically the teacher's. `share_frozen` points each such student parameter at
the teacher's own `nn.Parameter` object, so both models read one storage and moving or casting
one moves both. `set_trainable` does the opposite for what a stage trains: a trainable parameter
must never be the teacher's storage (training it would change the teacher), so it gets a private
fp32 copy first. Ties (embedding ↔ lm_head) survive both operations.
"""
import torch
from torch import nn

from salaconvert.surgery.registry import resolve_arch

FULL = "full_attention"


def converted_layers(student) -> list[int]:
    return [i for i, t in enumerate(student.config.layer_types) if t != FULL]


def attention_modules(model, layers: list[int] | None = None) -> dict[int, nn.Module]:
    """{layer index: attention module} of a teacher or hybrid `*ForCausalLM`."""
    arch = resolve_arch(model.model)
    blocks = getattr(model.model, arch.layers)
    idx = range(len(blocks)) if layers is None else layers
    return {i: getattr(blocks[i], arch.attention) for i in idx}


def trainable_names(student, which: str) -> list[str]:
    """Parameter names a stage trains: 'converted' (the replaced attention modules), 'attention'
    (every layer's attention) or 'all'. Sorted, so that optimizer state lines up on resume."""
    names = [n for n, _ in student.named_parameters(remove_duplicate=False)]
    if which == "all":
        return sorted(names)
    layers = converted_layers(student) if which == "converted" else list(range(student.config.num_hidden_layers))
    arch = resolve_arch(student.model)
    prefixes = tuple(f"model.{arch.layers}.{i}.{arch.attention}." for i in layers)
    return sorted(n for n in names if n.startswith(prefixes))


def _set_param(model: nn.Module, name: str, param: nn.Parameter) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner), attr, param)


def share_frozen(student, teacher, keep_own: set[str] = frozenset()) -> int:
    """Point every student parameter equal to the teacher's same-named one at the teacher's.

    Returns the bytes saved. Parameters named in `keep_own` are left alone.
    """
    teacher_params = dict(teacher.named_parameters(remove_duplicate=False))
    saved, seen = 0, set()
    for name, p in list(student.named_parameters(remove_duplicate=False)):
        t = teacher_params.get(name)
        if name in keep_own or t is None or t is p:
            continue
        if t.shape == p.shape and t.dtype == p.dtype and t.device == p.device and torch.equal(t, p):
            if id(p) not in seen:
                saved += p.numel() * p.element_size()
                seen.add(id(p))
            _set_param(student, name, t)
    return saved


def shared_storage(student, teacher) -> set[str]:
    """Student parameter names whose storage is the teacher's."""
    ptrs = {p.data_ptr() for p in teacher.parameters()}
    return {n for n, p in student.named_parameters(remove_duplicate=False) if p.data_ptr() in ptrs}


def set_trainable(student, teacher, names: list[str]) -> list[nn.Parameter]:
    """Make exactly `names` trainable (private fp32 copies where shared) and return them in order."""
    teacher_ptrs = {p.data_ptr() for p in teacher.parameters()}
    wanted = set(names)
    copies = {}
    for name, p in list(student.named_parameters(remove_duplicate=False)):
        if name not in wanted:
            continue
        if p.data_ptr() in teacher_ptrs or p.dtype != torch.float32:
            if id(p) not in copies:
                copies[id(p)] = nn.Parameter(p.detach().float().clone())
            _set_param(student, name, copies[id(p)])
    params, seen = [], set()
    for name, p in student.named_parameters(remove_duplicate=False):
        p.requires_grad_(name in wanted)
        if name in wanted and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def owned_state(student, teacher) -> dict[str, torch.Tensor]:
    """The student's own parameters (not the teacher's storage): what a checkpoint must keep."""
    shared = shared_storage(student, teacher)
    return {n: p.detach() for n, p in student.named_parameters() if n not in shared}


def load_owned(student, teacher, state: dict[str, torch.Tensor]) -> None:
    """Restore `owned_state` into a freshly built pair (un-sharing where the run had un-shared)."""
    shared = shared_storage(student, teacher)
    params = dict(student.named_parameters())
    missing = sorted(set(state) - set(params))
    if missing:
        raise KeyError(f"checkpoint has parameters the student lacks: {missing[:3]}")
    set_trainable(student, teacher, sorted(n for n in state if n in shared))
    params = dict(student.named_parameters())
    with torch.no_grad():
        for name, t in state.items():
            params[name].copy_(t)
    for p in student.parameters():
        p.requires_grad_(False)
