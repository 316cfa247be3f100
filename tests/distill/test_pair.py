"""Teacher and student share every identical frozen tensor (one storage); trainable ones never are the teacher's."""
import torch

from salaconvert.distill.pair import (converted_layers, set_trainable, share_frozen, shared_storage,
                                      trainable_names)
from salaconvert.distill.run import load_pair
from salaconvert.io.checkpoint import save_checkpoint
from salaconvert.layer_selection import LayerPlan, uniform_layer_types
from salaconvert.surgery.convert import convert
from tiny import save_tiny_teacher, tiny_teacher, tiny_tokenizer


def _frozen_names(student, which="converted"):
    trainable = set(trainable_names(student, which))
    return {n for n, _ in student.named_parameters(remove_duplicate=False) if n not in trainable}


def test_a_converted_pair_shares_frozen_tensors_and_trains_private_copies(arch):
    teacher = tiny_teacher(arch)
    student = convert(teacher, LayerPlan(uniform_layer_types(4, "1:3")))
    params = set_trainable(student, teacher, trainable_names(student, "converted"))
    shared = shared_storage(student, teacher)
    assert _frozen_names(student) <= shared
    assert not shared & set(trainable_names(student, "converted"))
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    assert all(torch.equal(p, before[n]) for n, p in teacher.named_parameters())  # the teacher is untouched
    # the tie embedding ↔ lm_head survives sharing
    if teacher.config.tie_word_embeddings:
        assert student.lm_head.weight is student.model.embed_tokens.weight


def test_loading_a_converted_directory_repoints_frozen_tensors_to_the_teacher(tmp_path):
    teacher_dir = save_tiny_teacher(tmp_path / "teacher")
    teacher = tiny_teacher("llama")
    hybrid = convert(teacher, LayerPlan(uniform_layer_types(4, "1:3")))
    save_checkpoint(hybrid, tiny_tokenizer(), tmp_path / "hybrid", {})
    t, s, tok, saved = load_pair(tmp_path / "hybrid", str(teacher_dir))
    set_trainable(s, t, trainable_names(s, "converted"))  # what stage 1 does first
    frozen = _frozen_names(s)
    shared = shared_storage(s, t)
    assert frozen <= shared  # every frozen student tensor is the teacher's storage ...
    assert not shared - frozen  # ... and nothing the stage trains is
    for name in frozen:  # one storage: the very same Parameter object
        assert s.get_parameter(name).data_ptr() == t.get_parameter(name).data_ptr()
    n_bytes = sum(p.numel() * p.element_size() for n, p in s.named_parameters() if n in frozen)
    assert saved >= n_bytes  # load_pair also shared the converted layers' teacher-equal tensors, until trained
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():  # sharing changed no value
        assert torch.equal(s(ids).logits, hybrid.float()(ids).logits)
    assert len(converted_layers(s)) == 4


def test_share_frozen_skips_tensors_that_differ():
    teacher = tiny_teacher("llama")
    student = convert(teacher, LayerPlan(uniform_layer_types(4, "1:3")))
    set_trainable(student, teacher, trainable_names(student, "all"))
    with torch.no_grad():
        student.model.norm.weight.add_(0.5)
    share_frozen(student, teacher)
    shared = shared_storage(student, teacher)
    assert "model.norm.weight" not in shared and "model.layers.0.mlp.up_proj.weight" in shared
