"""patch / unpatch / adapters: what patching changes, what it must never change, and what it refuses."""

import json

import pytest
import torch
from helpers import FAMILIES, left_padded_prompts, randomize_adapter, stock_greedy, tiny_model
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import mtp_model
from mtp_model.modules import GatedLoRALinear
from mtp_model.model_helpers import embed_tokens, gate_context, mask_token_ids


def _state(model):
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_patch_wraps_projections_and_keeps_plain_forwards_exact(family):
    model = tiny_model(family)
    ids, mask = left_padded_prompts([6, 3], model.config.vocab_size)
    before = model(input_ids=ids, attention_mask=mask).logits
    mtp_model.patch(model, mtp_model.MTPConfig(num_masks=4, lora_rank=4))
    randomize_adapter(model)
    wrapped = [m for m in model.modules() if isinstance(m, GatedLoRALinear)]
    assert len(wrapped) == 7 * model.config.num_hidden_layers
    after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)  # gate off: the base path, bit for bit
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in name or name.startswith("mtp.sampler") for name in trainable)
    assert not model.mtp.mask_embeddings.requires_grad


def test_target_modules_are_configurable():
    model = mtp_model.patch(tiny_model(), mtp_model.MTPConfig(target_modules=("q_proj", "v_proj")))
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, GatedLoRALinear)}
    assert names == {"q_proj", "v_proj"}


def test_gate_turns_lora_on_only_for_mask_tokens():
    model = randomize_adapter(mtp_model.patch(tiny_model(), mtp_model.MTPConfig(num_masks=2, lora_rank=4)))
    ids = torch.tensor([[5, 6, 7] + mask_token_ids(model)])
    embeds = embed_tokens(model, ids)
    assert torch.equal(embeds[0, 3], model.mtp.mask_embeddings[0])
    base = model.model(inputs_embeds=embeds).last_hidden_state
    with gate_context(model, ids >= model.config.vocab_size):
        gated = model.model(inputs_embeds=embeds).last_hidden_state
    # Causal attention: regular tokens before the masks are untouched, the masks change.
    assert torch.equal(gated[0, :3], base[0, :3])
    assert not torch.allclose(gated[0, 3:], base[0, 3:])


def test_unpatch_restores_the_model_exactly():
    model = tiny_model("qwen2")
    ids, mask = left_padded_prompts([5, 2], model.config.vocab_size)
    state, generate = _state(model), model.generate
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    implementation = model.config._attn_implementation
    mtp_model.unpatch(randomize_adapter(mtp_model.patch(model)))
    assert model.config._attn_implementation == implementation
    assert model.generate == generate and not hasattr(model, "mtp")
    restored = _state(model)
    assert restored.keys() == state.keys() and all(torch.equal(restored[k], state[k]) for k in state)
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False), expected)
    mtp_model.patch(model)  # and it can be patched again


@pytest.mark.parametrize("tied", [False, True])
def test_save_pretrained_of_a_patched_model_writes_the_base_model_and_the_adapter_beside_it(tmp_path, tied):
    """`from_pretrained` of what a patched model saves is the model before patching, key for key and bit for
    bit (no base_layer names, nothing of MTP); its `mtp_adapter` folder patches it back to the same output."""
    model = tiny_model("qwen2", seed=4, tie_word_embeddings=tied)
    state = _state(model)
    randomize_adapter(mtp_model.patch(model, mtp_model.MTPConfig(num_masks=3, lora_rank=4)), seed=4)
    ids, mask = left_padded_prompts([4, 6], model.config.vocab_size, seed=4)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=8)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    restored = _state(loaded)
    assert restored.keys() == state.keys() and all(torch.equal(restored[k], state[k]) for k in state)
    mtp_model.patch(loaded, adapter=tmp_path / "mtp_adapter")
    assert torch.equal(loaded.generate(ids, attention_mask=mask, max_new_tokens=8), expected)
    assert mtp_model.unpatch(loaded).save_pretrained.__func__ is type(loaded).save_pretrained


def test_adapter_round_trip(tmp_path):
    model = randomize_adapter(mtp_model.patch(tiny_model(seed=1), mtp_model.MTPConfig(num_masks=3, lora_rank=4)))
    mtp_model.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["mtp"]["num_masks"] == 3
    ids, mask = left_padded_prompts([4, 7], model.config.vocab_size)
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12)
    expected_stats = model.mtp_stats

    fresh = mtp_model.patch(tiny_model(seed=1), adapter=tmp_path)
    assert fresh.mtp_config.num_masks == 3 and fresh.mtp_config.lora_rank == 4
    adapter_tensors = {k: v for k, v in model.state_dict().items() if "lora_" in k or k.startswith("mtp.")}
    loaded = fresh.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in adapter_tensors.items())
    assert torch.equal(fresh.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12), expected)
    assert fresh.mtp_stats == expected_stats


def test_peft_loads_the_lora_part(tmp_path):
    peft = pytest.importorskip("peft")
    model = randomize_adapter(mtp_model.patch(tiny_model(seed=2), mtp_model.MTPConfig(num_masks=2, lora_rank=4)))
    mtp_model.save_adapter(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(tiny_model(seed=2), tmp_path)
    ours = model.model.layers[1].mlp.down_proj.lora_B.weight
    theirs = peft_model.base_model.model.model.layers[1].mlp.down_proj.lora_B["default"].weight
    assert torch.equal(ours, theirs)
    assert peft_model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == model.mtp_config.lora_scaling


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_size": 32}, "hidden_size"),
        ({"layers": 3}, "num_hidden_layers"),
        ({"vocab_size": 100}, "vocab_size"),
        ({"family": "qwen2"}, "model_type"),
    ],
)
def test_adapter_that_does_not_fit_is_refused(tmp_path, change, message):
    mtp_model.save_adapter(mtp_model.patch(tiny_model()), tmp_path)
    family = change.pop("family", "llama")
    with pytest.raises(ValueError, match=message):
        mtp_model.patch(tiny_model(family, **change), adapter=tmp_path)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda data: data["mtp"].pop("lora_alpha"), "lacks lora_alpha"),
    (lambda data: data["mtp"].pop("base_model"), "lacks base_model"),
    (lambda data: data["mtp"].__setitem__("base_model", "llama"), "'base_model' must give"),
    (lambda data: data.__setitem__("mtp", None), "lacks num_masks"),
    ("{not json", "not valid JSON"),
    ("weights: truncated", "not a readable safetensors file"),
    ("weights: missing", "adapter_model.safetensors is missing"),
])
def test_a_hand_edited_adapter_is_refused_by_name(tmp_path, edit, message):
    """A missing field would load with its default (another LoRA scale, an adapter that fits any model)."""
    mtp_model.save_adapter(randomize_adapter(mtp_model.patch(tiny_model())), tmp_path)
    config_file, weights_file = tmp_path / "adapter_config.json", tmp_path / "adapter_model.safetensors"
    if edit == "weights: truncated":
        weights_file.write_bytes(weights_file.read_bytes()[:100])
    elif edit == "weights: missing":
        weights_file.unlink()
    elif isinstance(edit, str):
        config_file.write_text(edit)
    else:
        data = json.loads(config_file.read_text())
        edit(data)
        config_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        mtp_model.patch(tiny_model(), adapter=tmp_path)


def test_refuses_unsupported_twice_patched_meta_and_non_adapters(tmp_path):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="supports llama"):
        mtp_model.patch(gpt2)
    model = mtp_model.patch(tiny_model())
    with pytest.raises(ValueError, match="already patched"):
        mtp_model.patch(model)
    with torch.device("meta"):
        meta_model = tiny_model()
    with pytest.raises(ValueError, match="meta device"):
        mtp_model.patch(meta_model)
    with pytest.raises(ValueError, match="adapter_config.json is missing"):
        mtp_model.patch(tiny_model(), adapter=tmp_path)
    with pytest.raises(ValueError, match="not patched"):
        mtp_model.unpatch(tiny_model())


def test_patched_model_still_generates_like_stock_before_any_training():
    # A fresh adapter (LoRA B = 0) changes nothing but the number of steps.
    model = tiny_model("qwen3")
    ids, mask = left_padded_prompts([4, 6, 5], model.config.vocab_size)
    expected = stock_greedy(model, ids, mask, 10)
    mtp_model.patch(model)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10), expected)
