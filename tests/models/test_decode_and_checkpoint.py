"""Prefill + decode == one forward; save → load == same logits; atomic writes; remote-code loading."""
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import assert_close
from salaconvert.io.checkpoint import INDEX, SIDECAR, save_checkpoint
from salaconvert.layer_selection import LayerPlan, uniform_layer_types
from salaconvert.layers import SparseAttention
from salaconvert.surgery.convert import convert
from tiny import SMALL_SPARSE, tiny_hybrid, tiny_teacher


def _hybrid(arch="llama", layer_types=None, attn="sdpa", lightning=None):
    return tiny_hybrid(layer_types or uniform_layer_types(4, "1:3"), arch, attn=attn, lightning=lightning)


@torch.no_grad()
def _prefill_then_decode(hybrid, x, prefill: int) -> torch.Tensor:
    """Logits of x: its first `prefill` tokens in one call, then one token at a time on the cache."""
    out = hybrid(x[:, :prefill], use_cache=True)
    cache, steps = out.past_key_values, [out.logits]
    for t in range(prefill, x.shape[1]):
        steps.append(hybrid(x[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(steps, 1)


@pytest.mark.parametrize("prefill", [1, 17, 40])
@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "lightning-gqa"])
def test_prefill_then_token_by_token_decode_equals_full_forward(arch, prefill, gqa):
    hybrid = _hybrid(arch, lightning={"gqa": gqa})
    x = torch.randint(0, 128, (2, 52))  # crosses dense_len=24: dense and sparse regimes both decode
    with torch.no_grad():
        full = hybrid(x, use_cache=False).logits
    # fp32; the recurrent and chunked Lightning forms sum in different orders: 1e-4 (acceptance bound).
    assert (_prefill_then_decode(hybrid, x, prefill) - full).abs().max().item() <= 1e-4


@pytest.mark.parametrize("prefill", [17, 40])
def test_coarse_normaliser_prefill_then_decode_equals_full_forward(prefill):
    """sparse.coarse_norm: the prefill pools coarse keys from the keys, decode from the cached
    compressed keys; both must select the same blocks. It must also change the selection (some
    logits differ from the exact normaliser's), or the option would not reach the kernels."""
    hybrid = tiny_hybrid(uniform_layer_types(4, "1:3"), "qwen2", sparse={**SMALL_SPARSE, "coarse_norm": True})
    x = torch.randint(0, 128, (2, 120), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = hybrid(x, use_cache=False).logits
        assert (_prefill_then_decode(hybrid, x, prefill) - full).abs().max().item() <= 1e-4
        for layer in hybrid.modules():
            if isinstance(layer, SparseAttention):
                layer.kernel_kwargs["coarse_norm"] = False
        assert (hybrid(x, use_cache=False).logits - full).abs().max().item() > 1e-3


def test_generate_with_cache_equals_rerunning_the_whole_sequence():
    hybrid = _hybrid()
    x = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        ids = hybrid.generate(x, max_new_tokens=20, min_new_tokens=20, do_sample=False)
        seq = x
        for _ in range(20):
            nxt = hybrid(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(ids, seq)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])  # a boolean and an additive float mask
def test_left_padded_batch_generates_what_each_prompt_generates_alone(arch, attn):
    """Padding tokens never reach a Lightning state or a softmax: within dense_len, a left-padded
    batch gives each row the tokens and logits it gets alone."""
    hybrid = _hybrid(arch, attn=attn)
    prompts = [torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 11)]
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(width - len(p)), torch.ones(len(p))]).long() for p in prompts])
    new = 8  # 11 + 8 < dense_len = 24: the regime where the sparse layers honour the mask
    with torch.no_grad():
        batch = hybrid.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        for row, p in enumerate(prompts):
            alone = hybrid.generate(p[None], max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                    output_logits=True, return_dict_in_generate=True)
            assert torch.equal(batch.sequences[row, width:], alone.sequences[0, len(p):]), f"row {row}"
            assert_close(torch.stack([s[row] for s in batch.logits]), torch.stack([s[0] for s in alone.logits]),
                         rtol=1e-5, what=f"row {row}: logits, padded batch vs alone")


@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "lightning-gqa"])
def test_save_then_load_gives_identical_logits_and_the_spec_files(tmp_path, gqa):
    hybrid = _hybrid("qwen3", lightning={"gqa": gqa})
    out = save_checkpoint(hybrid, None, tmp_path / "ckpt", {"plan": {"layer_types": hybrid.config.layer_types}})
    names = set(os.listdir(out))
    assert {"config.json", INDEX, "generation_config.json", SIDECAR}.issubset(names)
    assert any(n.startswith("model-") and n.endswith(".safetensors") for n in names)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "sala_hybrid" and config["layer_types"] == hybrid.config.layer_types
    assert config["teacher"]["model_type"] == "qwen3" and config["lightning"]["gqa"] is gqa and "sparse" in config
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, 128, (2, 45))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, hybrid(x).logits)


def test_tied_embeddings_stay_tied_after_loading(tmp_path):
    teacher = tiny_teacher("llama", tie_word_embeddings=True)
    hybrid = convert(teacher, LayerPlan(uniform_layer_types(4)))
    loaded = AutoModelForCausalLM.from_pretrained(save_checkpoint(hybrid, None, tmp_path / "c", {}))
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_interrupted_save_leaves_nothing_at_the_target(tmp_path, monkeypatch):
    hybrid = _hybrid()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C while the weights were being written

    monkeypatch.setattr(type(hybrid), "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(hybrid, None, tmp_path / "ckpt", {})
    assert os.listdir(tmp_path) == []


def test_trust_remote_code_loads_without_importing_salaconvert(tmp_path):
    hybrid = _hybrid()
    out = save_checkpoint(hybrid, None, tmp_path / "ckpt", {})
    x = torch.randint(0, 128, (1, 30))
    with torch.no_grad():
        expected = hybrid(x).logits
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        f"torch.save(m(x).logits.detach(), {str(tmp_path / 'y.pt')!r})\n"
        "print(type(m).__name__)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONSAFEPATH": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "SalaHybridForCausalLM" in done.stdout
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)
