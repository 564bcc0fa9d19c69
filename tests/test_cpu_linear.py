"""prepacked_linear: oneDNN on a packed weight where it applies, F.linear exactly everywhere else."""

import contextlib
import gc
import zlib

import pytest
import torch
import torch.nn.functional as F

import mtp_kernels
import mtp_model
from mtp_model import modules, step_forward
from mtp_kernels import backend, cpu_linear, derived
from mtp_kernels.cpu_linear import prepacked_linear
from tests.helpers import randomize_adapter, tiny_model

pytestmark = pytest.mark.skipif(not cpu_linear.onednn_available(), reason="this torch build has no oneDNN")


def fp64_linear(x, weight, bias):
    out = x.double() @ weight.double().t()
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("lead", [(1,), (3,), (25,), (81,), (2, 13), (1, 7, 3)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_a_float64_product(lead, with_bias):
    x = torch.randn(*lead, 37)
    weight = torch.randn(53, 37)
    bias = torch.randn(53) if with_bias else None
    with torch.no_grad():
        out = prepacked_linear(x, weight, bias)
    assert out.shape == (*lead, 53) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), fp64_linear(x, weight, bias), rtol=1e-5, atol=1e-4)


def test_a_strided_bias_is_read_by_its_strides():
    x, weight, bias = torch.randn(5, 12), torch.randn(11, 12), torch.randn(22)[::2]
    with torch.no_grad():
        torch.testing.assert_close(prepacked_linear(x, weight, bias).double(), fp64_linear(x, weight, bias),
                                   rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("called", ["inside inference_mode", "outside"])
def test_weights_made_in_inference_mode(called):
    """Inference tensors have no version counter: the packed path must still take them, F.linear's result."""
    with torch.inference_mode():
        x, weight, bias = torch.randn(5, 12), torch.randn(11, 12), torch.randn(11)
        lora_a, lora_b = torch.randn(4, 12), torch.randn(11, 4)
    gate = torch.tensor([False, True, False, True, True])
    context = torch.inference_mode() if called == "inside inference_mode" else torch.no_grad()
    with context:
        out = prepacked_linear(x, weight, bias)
        gated = mtp_kernels.gated_lora_linear(x, weight, bias, lora_a, lora_b, 2.0, gate)
        chosen = mtp_kernels.choose_tokens(x, weight)
    torch.testing.assert_close(out.double(), fp64_linear(x, weight, bias), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gated.double(), fp64_gated_lora(x, weight, bias, lora_a, lora_b, 2.0, gate),
                               rtol=1e-5, atol=1e-4)
    assert torch.equal(chosen, fp64_linear(x, weight, None).argmax(-1))
    with torch.inference_mode():
        weight.neg_()  # in place, and an inference tensor bumps no version: no packed copy may be stale
        torch.testing.assert_close(prepacked_linear(x, weight, bias).double(), fp64_linear(x, weight, bias),
                                   rtol=1e-5, atol=1e-4)
        assert torch.equal(mtp_kernels.choose_tokens(x, weight), fp64_linear(x, weight, None).argmax(-1))


def test_takes_strided_inputs():
    wide = torch.randn(9, 80)
    x = wide[:, ::2]  # [9, 40], not contiguous
    weight = torch.randn(24, 40)
    with torch.no_grad():
        out = prepacked_linear(x, weight)
    torch.testing.assert_close(out.double(), fp64_linear(x, weight, None), rtol=1e-5, atol=1e-4)


def test_the_packed_copy_is_kept_rebuilt_on_change_and_freed_with_the_weight():
    weight = torch.randn(16, 8)
    x = torch.randn(5, 8)
    key = derived.cache_key("packed", (weight,))
    with torch.no_grad():
        first = prepacked_linear(x, weight)
        packed = derived._cache[key][-1]
        prepacked_linear(x, weight)
        assert derived._cache[key][-1] is packed  # reused, not repacked
        weight.mul_(2)  # in place: the version changes, so the copy is rebuilt
        torch.testing.assert_close(prepacked_linear(x, weight), 2 * first)
        assert derived._cache[key][-1] is not packed
    del weight, packed
    gc.collect()
    assert key not in derived._cache


@pytest.mark.parametrize("edit", ["one bit", "two signs", "a row negated", "two values swapped", "none"])
def test_refresh_sees_edits_that_bump_no_version_and_keeps_no_copy(edit):
    """An edit through `.data` leaves the version alone; `refresh()` must still drop the packed copy, for
    edits a sum of the weight's bits would miss too, in a weight of several fingerprint chunks, and keep it
    when nothing changed. What it compares with is not a copy of the weight."""
    generator = torch.Generator().manual_seed(len(edit))
    weight = torch.randn(2500, 2000, generator=generator)  # 19 MiB: two 16 MiB chunks
    key = derived.cache_key("packed", (weight,))
    with torch.no_grad():
        prepacked_linear(torch.randn(3, 2000), weight)
    assert key in derived._cache
    kept = [t for _, fingerprint in derived._fingerprints.values() for t in fingerprint if isinstance(t, torch.Tensor)]
    assert not kept
    row, col = (int(i) for i in torch.randint(0, 2000, (2,), generator=generator))
    bits = weight.data.view(torch.int32)
    if edit == "one bit":
        bits[row, col] ^= 1 << int(torch.randint(0, 32, (), generator=generator))
    elif edit == "two signs":
        weight.data[row, col : col + 2].neg_()
    elif edit == "a row negated":
        weight.data[row].neg_()
    elif edit == "two values swapped":
        weight.data[row, [col, col + 1]] = weight[row, [col + 1, col]].clone()
    derived.refresh()
    assert (key in derived._cache) == (edit == "none")


def test_the_fingerprints_crc_is_the_standard_librarys():
    """zlib-ng's CRC-32 where installed, the standard library's otherwise: the same values either way."""
    data = torch.randint(0, 256, (3 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(5)).numpy()
    assert derived.crc32(data) == zlib.crc32(data) and derived.crc32(data[7:]) == zlib.crc32(data[7:])



def test_a_weight_freed_after_the_cache_modules_globals_are_cleared_raises_nothing(monkeypatch):
    """At interpreter exit a model's tensors may be freed after `derived`'s globals are set to None: the
    weak-reference callbacks hold their dicts themselves, so nothing prints "Exception ignored"."""
    unraisable = []
    monkeypatch.setattr("sys.unraisablehook", unraisable.append)
    weight = torch.randn(16, 8)
    with torch.no_grad():
        prepacked_linear(torch.randn(5, 8), weight)
    monkeypatch.setattr(derived, "_cache", None)
    monkeypatch.setattr(derived, "_fingerprints", None)
    del weight
    gc.collect()
    assert not unraisable

@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # said by mkldnn.flags itself
@pytest.mark.parametrize(
    "case", ["grad", "float16", "bfloat16", "float64", "torch_mode", "onednn_disabled"]
)
def test_is_f_linear_bit_for_bit_where_packing_does_not_apply(monkeypatch, case):
    dtype = getattr(torch, case) if case.startswith(("float", "bfloat")) else torch.float32
    monkeypatch.setattr(cpu_linear, "onednn_runs_bf16", lambda: False)  # a CPU without native bf16
    x = torch.randn(6, 20, dtype=dtype)
    weight = torch.randn(12, 20, dtype=dtype, requires_grad=case == "grad")
    if case == "torch_mode":
        monkeypatch.setenv(backend.ENV_VAR, "torch")
    expected = F.linear(x, weight)
    if case == "grad":
        out = prepacked_linear(x, weight)
        assert out.requires_grad and torch.equal(out, expected)
        return
    disabled = torch.backends.mkldnn.flags(enabled=False) if case == "onednn_disabled" else contextlib.nullcontext()
    with torch.no_grad(), disabled:
        assert torch.equal(prepacked_linear(x, weight), expected)


@pytest.mark.skipif(not cpu_linear.onednn_runs_bf16(), reason="this CPU's oneDNN emulates bf16")
def test_bf16_runs_packed_where_onednn_runs_it_natively_with_f_linears_bits(monkeypatch):
    """In bf16 F.linear itself runs oneDNN: the packed product gives its bits, for every row count."""
    packed = []
    original = cpu_linear._packed_weight
    monkeypatch.setattr(cpu_linear, "_packed_weight", lambda weight: packed.append(weight) or original(weight))
    weight, bias = torch.randn(40, 24, dtype=torch.bfloat16), torch.randn(40, dtype=torch.bfloat16)
    with torch.no_grad():
        for rows in (1, 4, 9, 33):
            x = torch.randn(rows, 24, dtype=torch.bfloat16)
            assert torch.equal(prepacked_linear(x, weight, bias), F.linear(x, weight, bias))
    assert packed


def test_a_trainable_weight_is_packed_only_inside_a_generate_call():
    """Fused AdamW writes a parameter without bumping its version: outside a generate call (which refreshes
    first) prepacked_linear must not serve it from a copy packed before the step."""
    weight = torch.nn.Parameter(torch.randn(12, 20))
    x = torch.randn(6, 20)
    with derived.refreshed(), torch.no_grad():
        prepacked_linear(x, weight)  # packed here, as in decoding
    weight.grad = torch.randn_like(weight)
    torch.optim.AdamW([weight], lr=1.0, fused=True).step()
    with torch.no_grad():
        assert torch.equal(prepacked_linear(x, weight), F.linear(x, weight))
        with derived.refreshed():
            torch.testing.assert_close(prepacked_linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_a_build_without_onednn_warns_once_and_uses_f_linear(monkeypatch):
    monkeypatch.setattr(cpu_linear, "onednn_available", lambda: False)
    backend.warn_once.cache_clear()
    x, weight = torch.randn(4, 8), torch.randn(3, 8)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="oneDNN"):
        out = prepacked_linear(x, weight)
    assert torch.equal(out, F.linear(x, weight))
    backend.warn_once.cache_clear()


def test_a_wrong_width_is_named():
    with torch.no_grad(), pytest.raises(ValueError, match="features"):
        prepacked_linear(torch.randn(4, 9), torch.randn(3, 8))


def test_decoding_runs_its_projections_prepacked_and_ordinary_forwards_do_not(monkeypatch):
    model = mtp_model.patch(tiny_model(), mtp_model.MTPConfig(num_masks=2, lora_rank=4))
    calls = []
    original = cpu_linear._packed_weight
    monkeypatch.setattr(cpu_linear, "_packed_weight", lambda weight: calls.append(weight) or original(weight))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        model(ids)
    assert not calls
    model.generate(ids, max_new_tokens=4, do_sample=False)
    assert calls
    assert any(weight is model.lm_head.weight for weight in calls)  # verification and drafts too
    calls.clear()
    monkeypatch.setenv(backend.ENV_VAR, "torch")
    model.generate(ids, max_new_tokens=4, do_sample=False)
    assert not calls  # the torch mode decodes through F.linear


def fp64_gated_lora(x, weight, bias, lora_a, lora_b, scaling, gate):
    lora = scaling * (x.double() @ lora_a.double().t()) @ lora_b.double().t()
    return fp64_linear(x, weight, bias) + gate[..., None] * lora


def suffix_gate(lead, gated_from):
    return (torch.arange(lead[-1]) >= gated_from).expand(lead)


GATES = [((9,), suffix_gate((9,), 4)), ((1, 15), suffix_gate((1, 15), 8)), ((3, 16), suffix_gate((3, 16), 4)),
         ((2, 5), suffix_gate((2, 5), 0)), ((1, 6), suffix_gate((1, 6), 6)),
         ((2, 7), torch.tensor([[0, 1, 0, 1, 1, 0, 1], [1, 0, 0, 0, 1, 1, 0]], dtype=torch.bool))]


@pytest.mark.parametrize(("lead", "gate"), GATES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("merge", [False, True])
def test_gated_lora_on_packed_matches_a_float64_gated_lora(lead, gate, with_bias, merge):
    torch.manual_seed(len(lead) + int(gate.sum()))
    x = torch.randn(*lead, 40)
    weight, lora_a, lora_b = torch.randn(24, 40), torch.randn(6, 40), torch.randn(24, 6)
    bias = torch.randn(24) if with_bias else None
    with torch.no_grad():
        out = cpu_linear.gated_lora_on_packed(x, [(weight, bias, lora_a, lora_b, 0.5)], gate, merge)
        base = prepacked_linear(x, weight, bias)
    assert out.shape == (*lead, 24)
    expected = fp64_gated_lora(x, weight, bias, lora_a, lora_b, 0.5, gate)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
    # The ungated rows are the packed base product itself.
    torch.testing.assert_close(out[~gate], base[~gate], rtol=0, atol=1e-5)


@pytest.mark.parametrize("gated_from", [0, 3, 7])
@pytest.mark.parametrize("merge", [False, True])
def test_grouped_gated_lora_matches_each_member(gated_from, merge):
    torch.manual_seed(gated_from)
    x = torch.randn(2, 7, 40)
    gate = suffix_gate((2, 7), gated_from)
    members = [(torch.randn(out, 40), torch.randn(out) if with_bias else None, torch.randn(4, 40),
                torch.randn(out, 4), scaling)
               for out, with_bias, scaling in [(24, True, 0.5), (8, False, 2.0), (16, True, 1.0)]]
    with torch.no_grad():
        outs = cpu_linear.gated_lora_on_packed(x, members, gate, merge).split([24, 8, 16], dim=-1)
    assert [tuple(out.shape) for out in outs] == [(2, 7, 24), (2, 7, 8), (2, 7, 16)]
    for out, (weight, bias, lora_a, lora_b, scaling) in zip(outs, members):
        expected = fp64_gated_lora(x, weight, bias, lora_a, lora_b, scaling, gate)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)


def test_the_merged_weight_follows_its_lora_factors():
    x = torch.randn(7, 12)
    gate = suffix_gate((7,), 3)
    weight, lora_a, lora_b = torch.randn(10, 12), torch.randn(3, 12), torch.zeros(10, 3)
    with torch.no_grad():
        before = cpu_linear.gated_lora_on_packed(x, [(weight, None, lora_a, lora_b, 2.0)], gate, merge=True)
        torch.testing.assert_close(before, prepacked_linear(x, weight))  # B = 0: no LoRA yet
        lora_b.normal_()  # a training step, in place
        after = cpu_linear.gated_lora_on_packed(x, [(weight, None, lora_a, lora_b, 2.0)], gate, merge=True)
    torch.testing.assert_close(after.double(), fp64_gated_lora(x, weight, None, lora_a, lora_b, 2.0, gate),
                               rtol=1e-5, atol=1e-4)


def test_the_merged_weight_is_freed_with_any_of_its_sources():
    x = torch.randn(4, 12)
    weight, lora_a, lora_b = torch.randn(10, 12), torch.randn(3, 12), torch.randn(10, 3)
    key = derived.cache_key("merged-lora", (weight, lora_a, lora_b), 2.0)
    with torch.no_grad():
        cpu_linear.gated_lora_on_packed(x, [(weight, None, lora_a, lora_b, 2.0)], suffix_gate((4,), 1), merge=True)
    assert key in derived._cache
    del lora_b  # an adapter's factor replaced or unloaded: its merged copy must not outlive it
    gc.collect()
    assert key not in derived._cache


def spy_on_merges(monkeypatch, module):
    """Records the row count of every merged product `module` runs through `gated_lora_on_packed`."""
    rows = []
    original = module.gated_lora_on_packed

    def spy(x, members, gate, merge, *args):
        if merge:
            rows.append(x.shape[-2])
        return original(x, members, gate, merge, *args)

    monkeypatch.setattr(module, "gated_lora_on_packed", spy)
    return rows


def test_decoding_merges_lora_for_short_steps_only(monkeypatch):
    """Linear decoding with 2 masks feeds 5 tokens a step, 3 without drafts (merged, as is the prefill's
    4 + 2); quadratic with 5 masks, 36 (not merged; its prefill's 4 + 5 is)."""
    model = mtp_model.patch(tiny_model(), mtp_model.MTPConfig(num_masks=5, lora_rank=4))
    rows = spy_on_merges(monkeypatch, step_forward)
    ids = torch.tensor([[5, 6, 7, 8]])
    model.generate(ids, max_new_tokens=6, do_sample=False, num_masks=2, decoding="linear")
    assert {5, 6} <= set(rows) <= {3, 5, 6}
    rows.clear()
    model.generate(ids, max_new_tokens=6, do_sample=False, num_masks=5, decoding="quadratic")
    assert set(rows) == {9}


@pytest.mark.parametrize(("rows", "merged"), [(5, True), (40, False), (cpu_linear.PACKED_MAX_ROWS + 1, None)])
@pytest.mark.parametrize("suffix", [True, False])
def test_the_gated_lora_op_runs_on_packed_weights_for_a_steps_rows(monkeypatch, rows, merged, suffix):
    """The op's CPU path: merged LoRA for a few rows, the packed product plus the LoRA term for more, the
    reference past `PACKED_MAX_ROWS`; the gated LoRA whatever the gate, within fp32 rounding of fp64."""
    torch.manual_seed(rows)
    calls = []
    original = cpu_linear.gated_lora_on_packed
    monkeypatch.setattr(cpu_linear, "gated_lora_on_packed",
                        lambda x, members, gate, merge, *args: calls.append(merge) or original(x, members, gate, merge,
                                                                                               *args))
    context = modules.GateContext()
    linear = modules.GatedLoRALinear(torch.nn.Linear(20, 12), rank=4, alpha=8, context=context)
    torch.nn.init.normal_(linear.lora_B.weight)
    linear.requires_grad_(False)  # an inference model's: trainable weights are never packed (next test)
    gate = suffix_gate((1, rows), rows // 2) if suffix else torch.rand(1, rows) < 0.5
    x = torch.randn(1, rows, 20)
    context.set(gate)
    with torch.no_grad():
        out = linear(x)
    assert calls == ([] if merged is None else [merged])
    lora = linear.scaling * (x.double() @ linear.lora_A.weight.double().t()) @ linear.lora_B.weight.double().t()
    expected = fp64_linear(x, linear.weight, linear.bias) + gate[..., None] * lora
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [5, 40])
@pytest.mark.parametrize("trained", ["lora", "all"])
def test_the_gated_lora_op_follows_weights_an_optimizer_updates_without_a_version_bump(rows, trained):
    """Fused AdamW (the HF Trainer's default) writes parameters without bumping their versions: after a
    step, the op's CPU path must compute with the new LoRA factors (and base weight, when that trains too),
    not with a packed or merged copy built from the old ones."""
    torch.manual_seed(rows)
    context = modules.GateContext()
    linear = modules.GatedLoRALinear(torch.nn.Linear(20, 12), rank=4, alpha=8, context=context)
    torch.nn.init.normal_(linear.lora_B.weight)
    linear.base_layer.requires_grad_(trained == "all")
    optimizer = torch.optim.AdamW([p for p in linear.parameters() if p.requires_grad], lr=0.1, fused=True)
    gate, x = suffix_gate((1, rows), rows // 2), torch.randn(1, rows, 20)
    context.set(gate)
    with torch.no_grad():
        linear(x)  # where anything were cached from these weights, it would be now
    linear(x).square().sum().backward()
    versions = [p._version for p in linear.parameters()]
    optimizer.step()
    assert [p._version for p in linear.parameters()] == versions  # the premise: no version bump
    with torch.no_grad():
        out = linear(x)
    expected = fp64_gated_lora(x, linear.weight, linear.bias, linear.lora_A.weight, linear.lora_B.weight,
                               linear.scaling, gate)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)


def test_inside_a_generate_call_trainable_weights_run_packed(monkeypatch):
    """Where a generate call has refreshed the cache (`derived.refreshed()`), no optimizer steps: the op's
    CPU path packs and merges a trainable layer's tensors too."""
    calls = []
    original = cpu_linear.gated_lora_on_packed
    monkeypatch.setattr(cpu_linear, "gated_lora_on_packed", lambda *args: calls.append(args[3]) or original(*args))
    context = modules.GateContext()
    linear = modules.GatedLoRALinear(torch.nn.Linear(20, 12), rank=4, alpha=8, context=context)
    x, gate = torch.randn(1, 5, 20), suffix_gate((1, 5), 2)
    context.set(gate)
    with torch.no_grad():
        outside = linear(x)
        with derived.refreshed():
            inside = linear(x)
    assert calls == [True]  # the merged product, inside only
    torch.testing.assert_close(inside, outside, rtol=1e-5, atol=1e-5)


def test_a_model_too_large_for_the_cache_never_merges(monkeypatch):
    """Merged products double the weights a step reads: only models whose gated weights, doubled, stay
    near the last-level cache use them (the 4M demo model does, SmolLM2-135M does not)."""
    merged = spy_on_merges(monkeypatch, step_forward)
    ids = torch.tensor([[5, 6, 7, 8]])
    small = randomize_adapter(mtp_model.patch(tiny_model(), mtp_model.MTPConfig(num_masks=3, lora_rank=4)))
    small.generate(ids, max_new_tokens=8, decoding="linear")
    assert step_forward.StepForward.build(small).merge_allowed and merged  # merged products where they apply
    merged.clear()
    monkeypatch.setattr(cpu_linear, "MERGED_LORA_MAX_MODEL", 1000)
    large = randomize_adapter(mtp_model.patch(tiny_model(), mtp_model.MTPConfig(num_masks=3, lora_rank=4)))
    assert not step_forward.StepForward.build(large).merge_allowed
    stock = type(large).generate(large, ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(large.generate(ids, max_new_tokens=8, decoding="linear"), stock) and not merged
