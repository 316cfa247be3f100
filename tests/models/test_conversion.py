"""Conversion of each registered architecture: exactness where nothing changes, and a working hybrid."""
import pytest
import torch

from salaconvert.layer_selection import LayerPlan, uniform_layer_types
from salaconvert.surgery.convert import convert
from salaconvert.surgery.registry import ConversionError
from helpers import assert_close
from tiny import SMALL_SPARSE, tiny_teacher


def test_all_full_attention_plan_reproduces_teacher(arch):
    teacher = tiny_teacher(arch)
    hybrid = convert(teacher, LayerPlan(["full_attention"] * 4))
    x = torch.randint(0, 128, (2, 37))
    with torch.no_grad():
        diff = (hybrid(x).logits - teacher(x).logits).abs().max().item()
    # fp32, the same modules and tensors: 1e-5 is the acceptance bound (it is exactly 0 in practice).
    assert diff <= 1e-5, diff


def test_one_to_three_plan_runs_forward_backward_and_generates(arch):
    teacher = tiny_teacher(arch)
    hybrid = convert(teacher, LayerPlan(uniform_layer_types(4, "1:3")), sparse=SMALL_SPARSE)
    assert hybrid.config.layer_types == ["sparse_attention", "linear_attention", "linear_attention", "sparse_attention"]
    x = torch.randint(0, 128, (2, 40))  # longer than dense_len: the sparse path runs
    hybrid.train()
    out = hybrid(x, labels=x)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    new = [n for n, p in hybrid.named_parameters() if "z_proj" in n or "og_proj" in n or "o_norm" in n]
    assert new and all(hybrid.get_parameter(n).grad is not None for n in new)
    assert all(torch.isfinite(p.grad).all() for p in hybrid.parameters() if p.grad is not None)
    hybrid.eval()
    ids = hybrid.generate(x[:1, :8], max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert ids.shape == (1, 14)


def test_conversion_reuses_teacher_tensors():
    teacher = tiny_teacher("llama")
    hybrid = convert(teacher, LayerPlan(uniform_layer_types(4, "1:3")))
    t_layers, h_layers = teacher.model.layers, hybrid.model.layers
    assert h_layers[1].mlp.up_proj.weight.data_ptr() == t_layers[1].mlp.up_proj.weight.data_ptr()
    assert h_layers[1].self_attn.q_proj.weight.data_ptr() == t_layers[1].self_attn.q_proj.weight.data_ptr()
    assert h_layers[0].self_attn.k_proj.weight.data_ptr() == t_layers[0].self_attn.k_proj.weight.data_ptr()
    assert hybrid.model.embed_tokens.weight.data_ptr() == teacher.model.embed_tokens.weight.data_ptr()


def test_gqa_expansion_repeats_each_kv_head_for_its_query_group():
    teacher = tiny_teacher("qwen2")  # k_proj has a bias too
    hybrid = convert(teacher, LayerPlan(uniform_layer_types(4, "1:3")))
    k_t, k_h = teacher.model.layers[1].self_attn.k_proj, hybrid.model.layers[1].self_attn.k_proj
    d, group = 16, 2
    assert k_h.weight.shape == (4 * d, 64)
    for h in range(4):
        assert torch.equal(k_h.weight[h * d:(h + 1) * d], k_t.weight[(h // group) * d:(h // group + 1) * d])
        assert torch.equal(k_h.bias[h * d:(h + 1) * d], k_t.bias[(h // group) * d:(h // group + 1) * d])


def test_lightning_gqa_keeps_the_teachers_kv_heads():
    """lightning.gqa: the linear layers take the teacher's K/V projections as they are (the same
    tensors), so the hybrid has fewer parameters, and its logits differ from the MHA conversion's
    only as the model does: with identical weights per head, MHA-repeated and shared K/V agree."""
    teacher = tiny_teacher("qwen2")  # k_proj has a bias too
    gqa = convert(teacher, LayerPlan(uniform_layer_types(4, "1:3")), lightning={"gqa": True})
    mha = convert(teacher, LayerPlan(uniform_layer_types(4, "1:3")))
    for name in ("k_proj", "v_proj"):
        t, h = getattr(teacher.model.layers[1].self_attn, name), getattr(gqa.model.layers[1].self_attn, name)
        assert h.weight.data_ptr() == t.weight.data_ptr() and h.bias.data_ptr() == t.bias.data_ptr()
    assert gqa.num_parameters() == mha.num_parameters() - 2 * 2 * (64 + 1) * 32  # 2 layers x k, v x (4 - 2) heads x 16
    x = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        assert_close(gqa(x).logits, mha(x).logits, rtol=1e-5, what="logits, shared vs repeated K/V")


def test_qwen3_sparse_and_linear_layers_keep_the_teachers_qk_norm():
    teacher = tiny_teacher("qwen3")
    hybrid = convert(teacher, LayerPlan(uniform_layer_types(4, "1:3")))
    for i in (0, 1):
        assert torch.equal(hybrid.model.layers[i].self_attn.q_norm.weight, teacher.model.layers[i].self_attn.q_norm.weight)


def test_sparse_layer_without_rope_differs_from_teacher_only_through_position_and_gate():
    """A sparse plan with rope kept and the gate off is the teacher's attention exactly (dense regime)."""
    teacher = tiny_teacher("llama")
    plan = LayerPlan(["sparse_attention"] * 4)
    same = convert(teacher, plan, sparse={"rope": True, "output_gate": False})
    nope = convert(teacher, plan)
    x = torch.randint(0, 128, (1, 20))
    with torch.no_grad():
        assert (same(x).logits - teacher(x).logits).abs().max() < 1e-5
        assert (nope(x).logits - teacher(x).logits).abs().max() > 1e-3  # NoPE + gate really change it


def test_plan_is_validated_before_anything_is_built():
    teacher = tiny_teacher("llama")
    with pytest.raises(ValueError, match="3 entries, but the model has 4 layers"):
        convert(teacher, LayerPlan(["sparse_attention"] * 3))
    with pytest.raises(ValueError, match="every layer is linear"):
        convert(teacher, LayerPlan(["linear_attention"] * 4))


def test_unsupported_attention_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ConversionError, match="gpt2"):
        convert(model, LayerPlan(["sparse_attention"] * 2))


def test_generic_detection_converts_an_unregistered_rotary_decoder():
    from transformers import OlmoConfig, OlmoForCausalLM
    from salaconvert.surgery.convert import teacher_arch

    torch.manual_seed(0)
    teacher = OlmoForCausalLM(OlmoConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                         num_attention_heads=4, vocab_size=128)).eval()
    assert teacher_arch(teacher).generic
    hybrid = convert(teacher, LayerPlan(["full_attention"] * 4))
    x = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert (hybrid(x).logits - teacher(x).logits).abs().max() <= 1e-5
    assert convert(teacher, LayerPlan(uniform_layer_types(4)))(x).logits.shape == (1, 12, 128)
