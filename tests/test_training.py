"""Training layout, losses and MTPTrainer: isolation of the base path, LCM pairing, learning end to end."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import counting_examples, randomize_adapter, stock_greedy, tiny_model
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments

import mtp_model
from mtp_model.layout import training_attention_mask, training_layout
from mtp_model.model_helpers import embed_tokens, gate_context
from mtp_model.training import (
    IGNORE_INDEX,
    attention_inputs,
    LossWeights,
    MTPDataCollator,
    MTPTrainer,
    enable_gradient_checkpointing,
    mtp_loss,
)


def test_layout_matches_the_paper_figure():
    # Fig. 4 of the paper, k = 2: x0 m1 m2 x1 m1 m2 x2 m1 m2 x3 with every label a response token.
    layout = training_layout(torch.tensor([10, 11, 12, 13]), torch.tensor([0, 1, 1, 1]).bool(), 2, 100)
    assert layout.input_ids.tolist() == [10, 100, 101, 11, 100, 101, 12, 100, 101, 13]
    assert layout.position_ids.tolist() == [0, 1, 2, 1, 2, 3, 2, 3, 4, 3]
    assert layout.labels.tolist() == [11, 12, 13, 12, 13, -100, 13, -100, -100, -100]
    assert layout.previous_ids.tolist()[:6] == [10, 11, 12, 11, 12, 13]


def test_no_masks_after_prompt_tokens():
    loss_mask = torch.tensor([0, 0, 0, 1, 1]).bool()  # prompt x0..x2, response x3 x4
    layout = training_layout(torch.arange(5), loss_mask, 3, 50)
    # Only x2 (label x3) and x3 (label x4) are loss-bearing.
    assert layout.anchor[layout.mask_number > 0].unique().tolist() == [2, 3]
    assert (layout.labels[layout.mask_number == 0] != IGNORE_INDEX).tolist() == [False, False, True, True, False]


def test_attention_rule():
    layout = training_layout(torch.arange(4), torch.tensor([0, 1, 1, 1]).bool(), 2, 100)
    allowed = training_attention_mask(layout.anchor[None], layout.mask_number[None], torch.ones(1, 10, dtype=torch.bool))[0, 0]
    tokens = list(zip(layout.anchor.tolist(), layout.mask_number.tolist()))
    for q, (a1, r1) in enumerate(tokens):
        for k, (a2, r2) in enumerate(tokens):
            assert bool(allowed[q, k]) == ((r2 == 0 and a2 <= a1) or (a2 == a1 and 0 < r2 <= r1))


def test_consistency_pairing_equals_brute_force():
    ids, loss_mask = torch.arange(9), torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 1]).bool()
    layout = training_layout(ids, loss_mask, 3, 100)
    for slot, target in enumerate(layout.consistency_target.tolist()):
        position, is_mask = int(layout.position_ids[slot]), int(layout.mask_number[slot]) > 0
        regular_same_position = [s for s in range(len(layout.input_ids))
                                 if int(layout.mask_number[s]) == 0 and int(layout.position_ids[s]) == position]
        expected = regular_same_position[0] if is_mask and regular_same_position else -1
        assert target == expected


def test_regular_tokens_keep_the_base_model_outputs():
    model = tiny_model(seed=1)
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    plain_logits = model(input_ids=ids).logits
    mtp_model.patch(model, mtp_model.MTPConfig(num_masks=3, lora_rank=4))
    randomize_adapter(model, std=0.5)
    batch = MTPDataCollator(3, 96)([{"input_ids": ids[0], "loss_mask": torch.arange(12) >= 5},
                                    {"input_ids": ids[1, :9], "loss_mask": torch.arange(9) >= 2}])
    embeds = embed_tokens(model, batch["input_ids"])
    kwargs = dict(inputs_embeds=embeds, position_ids=batch["position_ids"], **attention_inputs(model, batch))
    with gate_context(model, batch["input_ids"] >= 96):
        gated = model.model(**kwargs).last_hidden_state
    ungated = model.model(**kwargs).last_hidden_state  # LoRA off everywhere
    regular = (batch["input_ids"] < 96) & batch["valid"]
    # The gate and the mask isolate regular tokens exactly from the (random, large) adapter ...
    assert torch.equal(gated[regular], ungated[regular])
    masks = batch["input_ids"] >= 96
    assert not torch.allclose(gated[masks], ungated[masks])
    # ... and they are the plain model's next-token outputs (same math over more, masked-out keys).
    for row, length in enumerate([12, 9]):
        logits = model.lm_head(gated[row][regular[row]])
        torch.testing.assert_close(logits, plain_logits[row, :length], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("forward", ["step_forward", "decoder"])
def test_decoding_drafts_from_the_mask_states_that_training_trains(family, forward):
    # Verification keeps the output lossless whatever the masks hold, so a mismatch between the states
    # training teaches and the states a decoding step drafts from would only show as fewer accepted drafts.
    # A quadratic step whose drafts are the sequence's own next tokens must give each anchor's mask block the
    # training forward's states for the same anchor.
    from mtp_model.attention import MTPCache
    from mtp_model.decoding import Decoder
    from mtp_kernels.sampler import SamplingParams

    k, n, length, p = 3, 2, 13, 7
    model = randomize_adapter(mtp_model.patch(tiny_model(family, seed=3), mtp_model.MTPConfig(num_masks=k, lora_rank=4)),
                              std=0.3)
    ids = torch.randint(3, 96, (length,), generator=torch.Generator().manual_seed(3))
    batch = MTPDataCollator(k, 96)([{"input_ids": ids, "loss_mask": torch.arange(length) >= 4}])
    with torch.no_grad(), gate_context(model, batch["input_ids"] >= 96):
        trained = model.model(inputs_embeds=embed_tokens(model, batch["input_ids"]), position_ids=batch["position_ids"],
                              **attention_inputs(model, batch)).last_hidden_state[0]

    decoder = Decoder(model, k, "quadratic", True, SamplingParams(), None)
    if forward == "decoder":
        decoder.step_forward = None
    layout, template = decoder.step_shape(n)
    cache = MTPCache(len(model.model.layers), 1, p + layout.size, torch.device("cpu"))
    cache.starts = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        decoder.forward(ids[None, :p], torch.arange(p)[None], cache, torch.ones(p, p, dtype=torch.bool).tril())
        cache.keep(torch.arange(p)[None], p)
        step_ids = template.clone()
        step_ids[layout.regular] = ids[p : p + n + 1]
        hidden = decoder.forward(step_ids[None], p + layout.position_offset[None], cache, layout.block_mask)[0]
    for g in range(n + 1):
        block = (batch["anchor"][0] == p + g) & (batch["mask_number"][0] > 0)
        torch.testing.assert_close(hidden[layout.masks[g]], trained[block], rtol=1e-4, atol=1e-5)
        # The states differ from anchor to anchor: the comparison above cannot pass by accident.
        assert not torch.allclose(hidden[layout.masks[g]], hidden[layout.masks[(g + 1) % (n + 1)]], atol=1e-3)


def test_loss_terms_and_gradients_reach_only_the_adapter():
    model = randomize_adapter(mtp_model.patch(tiny_model(seed=2), mtp_model.MTPConfig(num_masks=2, lora_rank=4)))
    batch = MTPDataCollator(2, 96)(counting_examples(3, 96))
    loss, terms = mtp_loss(model, batch, LossWeights(consistency_reduction="sum"))
    assert set(terms) == {"loss_base", "loss_sampler", "loss_consistency"} and all(v > 0 for v in terms.values())
    loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_" in name or name.startswith("mtp.sampler") for name in with_grad)


def test_mask_decay_weights_each_mask_s_cross_entropy():
    model = randomize_adapter(mtp_model.patch(tiny_model(seed=2), mtp_model.MTPConfig(num_masks=3, lora_rank=4)))
    batch = MTPDataCollator(3, 96)(counting_examples(3, 96))
    # A vanishing decay leaves only regular tokens and first masks: the same as not labelling masks 2 and 3.
    _, decayed = mtp_loss(model, batch, LossWeights(mask_decay=1e-7))
    first_masks_only = dict(batch, labels=batch["labels"].masked_fill(batch["mask_number"] >= 2, -100))
    _, expected = mtp_loss(model, first_masks_only)
    for term in ("loss_base", "loss_sampler"):
        assert abs(decayed[term] - expected[term]) < 1e-4 * expected[term]
    _, plain = mtp_loss(model, batch)
    assert abs(plain["loss_sampler"] - expected["loss_sampler"]) > 1e-3 * expected["loss_sampler"]  # they counted
    assert decayed["loss_consistency"] == plain["loss_consistency"]
    with pytest.raises(ValueError, match="mask_decay"):
        LossWeights(mask_decay=0.0)
    with pytest.raises(ValueError, match="consistency_reduction"):
        LossWeights(consistency_reduction="max")


def _train(model, examples, tmp_path, steps, lr=5e-3, **kwargs):
    options = dict(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8, learning_rate=lr,
        logging_steps=max(1, steps // 4), save_strategy="no", report_to=[], use_cpu=True,
        remove_unused_columns=False, disable_tqdm=True, seed=0,
    )
    args = TrainingArguments(**(options | kwargs))
    collator = MTPDataCollator(model.mtp_config.num_masks, model.config.vocab_size)
    trainer = MTPTrainer(model=model, args=args, train_dataset=examples, data_collator=collator)
    trainer.train()
    return trainer


def test_loss_falls_and_logs_each_term(tmp_path):
    model = mtp_model.patch(tiny_model(seed=3, vocab_size=40), mtp_model.MTPConfig(num_masks=3, lora_rank=8))
    examples = counting_examples(64, 40, seed=3)
    collator = MTPDataCollator(3, 40)
    _, before = mtp_loss(model, collator(examples[:16]))
    trainer = _train(model, examples, tmp_path, steps=40)
    _, after = mtp_loss(model, collator(examples[:16]))
    # The base term is the frozen model's own loss on regular tokens plus the masks' share: only the
    # trained terms must fall clearly.
    trained = ("loss_sampler", "loss_consistency")
    assert sum(after[t] for t in trained) < 0.85 * sum(before[t] for t in trained)
    assert after["loss_base"] < before["loss_base"]
    logged = [entry for entry in trainer.state.log_history if "loss_sampler" in entry]
    assert logged and {"loss_base", "loss_consistency", "layout_tokens_per_second", "peak_rss_gib"} <= set(logged[0])
    assert logged[0]["layout_tokens_per_second"] > 0 and logged[0]["peak_rss_gib"] > 0


def test_gradient_accumulation_is_a_larger_batch(tmp_path):
    """Two micro-batches of 4 accumulated take the step one batch of 8 takes (plain SGD, no clipping): the
    Trainer divides each micro-batch's mean loss by the accumulation steps."""
    examples = counting_examples(8, 40, seed=7)
    trained = []
    for batch, accumulation in ((8, 1), (4, 2)):
        model = mtp_model.patch(tiny_model(seed=7, vocab_size=40), mtp_model.MTPConfig(num_masks=2, lora_rank=4))
        start = model.mtp.sampler.mlp[0].weight.detach().clone()
        _train(model, examples, tmp_path / str(batch), steps=1, lr=1e-2, per_device_train_batch_size=batch,
               gradient_accumulation_steps=accumulation, optim="sgd", max_grad_norm=1e9,
               lr_scheduler_type="constant")
        trained.append(model.mtp.sampler.mlp[0].weight.detach() - start)
    torch.testing.assert_close(trained[1], trained[0], rtol=0.05, atol=1e-6)


def test_evaluation_batches_stay_out_of_the_training_log(tmp_path):
    model = mtp_model.patch(tiny_model(seed=8, vocab_size=40), mtp_model.MTPConfig(num_masks=2, lora_rank=4))
    trainer = _train(model, counting_examples(16, 40, seed=8), tmp_path, steps=1)
    trainer.evaluate(counting_examples(24, 40, seed=9))
    assert trainer._term_count == 0 and not trainer._term_sums


def test_mixed_precision_trains_an_fp32_adapter_under_autocast(tmp_path):
    """TrainingArguments(bf16=True) on an fp32 model is torch.autocast: the gated linears compute in bf16,
    the adapter's parameters and their gradients stay fp32."""
    model = mtp_model.patch(tiny_model(seed=10, vocab_size=40), mtp_model.MTPConfig(num_masks=2, lora_rank=4))
    batch = MTPDataCollator(2, 40)(counting_examples(4, 40, seed=10))
    full, _ = mtp_loss(model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, _ = mtp_loss(model, batch)
    mixed.backward()
    torch.testing.assert_close(mixed.float(), full, rtol=0.05, atol=0.05)
    lora_a = model.model.layers[0].self_attn.q_proj.lora_A.weight
    assert lora_a.dtype == torch.float32 and lora_a.grad is not None and lora_a.grad.dtype == torch.float32
    _train(model, counting_examples(8, 40, seed=10), tmp_path, steps=1, bf16=True)


def test_the_trainer_keeps_the_collators_columns_and_refuses_an_unpatched_model(tmp_path):
    model = mtp_model.patch(tiny_model(seed=11, vocab_size=40), mtp_model.MTPConfig(num_masks=2, lora_rank=4))
    _train(model, counting_examples(8, 40, seed=11), tmp_path, steps=1, remove_unused_columns=True)  # the default
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="patched with mtp_model.patch"):
        MTPTrainer(model=tiny_model(seed=11, vocab_size=40), args=args, train_dataset=counting_examples(8, 40),
                   data_collator=MTPDataCollator(2, 40))


def test_checkpoint_holds_a_loadable_adapter(tmp_path):
    model = mtp_model.patch(tiny_model(seed=4, vocab_size=40), mtp_model.MTPConfig(num_masks=2, lora_rank=4))
    trainer = _train(model, counting_examples(16, 40, seed=4), tmp_path, steps=2)
    trainer.save_model(str(tmp_path / "final"))
    fresh = mtp_model.patch(tiny_model(seed=4, vocab_size=40), adapter=tmp_path / "final")
    assert torch.equal(fresh.mtp.sampler.mlp[0].weight, model.mtp.sampler.mlp[0].weight)
    assert not (tmp_path / "final" / "model.safetensors").exists()  # the frozen base is not the trainer's to save


def test_resuming_continues_from_the_checkpoints_adapter(tmp_path):
    examples = counting_examples(32, 40, seed=6)
    straight = mtp_model.patch(tiny_model(seed=6, vocab_size=40), mtp_model.MTPConfig(num_masks=2, lora_rank=4))
    _train(straight, examples, tmp_path / "straight", steps=4, lr_scheduler_type="constant")
    first = mtp_model.patch(tiny_model(seed=6, vocab_size=40), mtp_model.MTPConfig(num_masks=2, lora_rank=4))
    _train(first, examples, tmp_path / "resumed", steps=2, save_strategy="steps", save_steps=2,
           lr_scheduler_type="constant")
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (checkpoint / "model.safetensors").exists()
    # A fresh process: a new model whose adapter differs until the checkpoint is loaded into it.
    second = mtp_model.patch(tiny_model(seed=6, vocab_size=40), mtp_model.MTPConfig(num_masks=2, lora_rank=4))
    torch.nn.init.normal_(second.mtp.sampler.mlp[0].weight)
    args = TrainingArguments(output_dir=str(tmp_path / "resumed"), max_steps=4, per_device_train_batch_size=8,
                             learning_rate=5e-3, save_strategy="no", report_to=[], use_cpu=True,
                             remove_unused_columns=False, disable_tqdm=True, seed=0, lr_scheduler_type="constant")
    MTPTrainer(model=second, args=args, train_dataset=examples,
               data_collator=MTPDataCollator(2, 40)).train(resume_from_checkpoint=str(checkpoint))
    for (name, want), got in zip(straight.named_parameters(), second.parameters()):
        if want.requires_grad:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_trained_adapter_reaches_several_tokens_per_step_losslessly(tmp_path):
    torch.manual_seed(0)
    vocab_size = 40
    model = tiny_model(seed=5, vocab_size=vocab_size, hidden_size=64, layers=2)
    examples = counting_examples(256, vocab_size, seed=5, length=24, prompt=3)
    # First teach the base model the task (a full fine-tune of the tiny base) ...
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(150):
        batch = torch.stack([e["input_ids"] for e in examples[(step * 16) % 256 : (step * 16) % 256 + 16]])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    # ... then train its MTP adapter, k = 4.
    mtp_model.patch(model, mtp_model.MTPConfig(num_masks=4, lora_rank=16, lora_alpha=32))
    _train(model, examples, tmp_path, steps=200, lr=3e-3)
    model.eval()
    prompts = torch.stack([e["input_ids"][:3] for e in counting_examples(4, vocab_size, seed=99, length=3, prompt=3)])
    expected = stock_greedy(model, prompts, torch.ones_like(prompts), 40)
    out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=40)
    assert torch.equal(out, expected)
    assert model.mtp_stats["tokens_per_step"] > 2.5, model.mtp_stats


class _StopAt(TrainerCallback):
    """Interrupts a run after `step` optimizer steps, as a crash or a preemption would."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


@pytest.mark.parametrize("anchor_fraction", [1.0, 0.5])
def test_resume_from_checkpoint_continues_the_same_run(tmp_path, anchor_fraction):
    """Exactly, also where the collator draws each batch's anchors from torch's generator (the SmolLM2
    recipe's anchor fraction 0.5): the resumed run's first batch is drawn from the checkpoint's state."""
    examples = counting_examples(32, 40, seed=6)

    def run(model, output_dir, max_steps=4, **options):
        args = TrainingArguments(
            output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=5e-3,
            save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, remove_unused_columns=False,
            disable_tqdm=True, seed=0,
        )
        trainer = MTPTrainer(model=model, args=args, train_dataset=examples,
                             data_collator=MTPDataCollator(2, 40, anchor_fraction=anchor_fraction),
                             callbacks=options.pop("callbacks", None))
        trainer.train(**options)
        return trainer

    def fresh():
        return mtp_model.patch(tiny_model(seed=6, vocab_size=40), mtp_model.MTPConfig(num_masks=2, lora_rank=4))

    straight = fresh()
    run(straight, tmp_path / "straight")
    run(fresh(), tmp_path / "resumed", callbacks=[_StopAt(2)])
    assert (tmp_path / "resumed" / "checkpoint-2" / "adapter_config.json").is_file()
    resumed = fresh()
    trainer = run(resumed, tmp_path / "resumed", resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    for ours, theirs in zip(resumed.mtp.sampler.parameters(), straight.mtp.sampler.parameters()):
        torch.testing.assert_close(ours, theirs)
    # Resumed at its (new) max_steps, a run stays where it is: the Trainer's loop would take one more step.
    again = fresh()
    trainer = run(again, tmp_path / "resumed", max_steps=2, resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    assert trainer.state.global_step == 2 and not (tmp_path / "resumed" / "checkpoint-3").exists()
    checkpoint = mtp_model.patch(tiny_model(seed=6, vocab_size=40), adapter=tmp_path / "resumed" / "checkpoint-2")
    for ours, theirs in zip(again.mtp.sampler.parameters(), checkpoint.mtp.sampler.parameters()):
        torch.testing.assert_close(ours, theirs)


def _checkpointing_model():
    return randomize_adapter(mtp_model.patch(tiny_model(seed=7, vocab_size=40), mtp_model.MTPConfig(num_masks=2, lora_rank=4)))


@pytest.mark.parametrize("switch", ["enable_gradient_checkpointing", "trainer_flag"])
def test_gradient_checkpointing_gives_the_same_gradients(switch, tmp_path):
    examples = counting_examples(4, 40, seed=7)

    def gradients(checkpointing):
        model = _checkpointing_model()
        if switch == "trainer_flag":  # the Trainer's own switch must reach the gate-aware checkpointing
            args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], remove_unused_columns=False,
                                     gradient_checkpointing=checkpointing)
            trainer = MTPTrainer(model=model, args=args, train_dataset=examples, data_collator=MTPDataCollator(2, 40))
            assert not getattr(trainer.args, "gradient_checkpointing", False)  # the Trainer will not redo it
        elif checkpointing:
            enable_gradient_checkpointing(model)
        assert any(getattr(layer, "gradient_checkpointing", False) for layer in model.model.layers) == checkpointing
        model.train()
        loss, _ = mtp_loss(model, MTPDataCollator(2, 40)(examples))
        loss.backward()
        return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and any(".lora_A." in name for name in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6)


def test_unpatch_turns_off_the_adapters_checkpointing():
    """Its checkpoints restore a patched model's gate: the stock model after unpatch trains as stock."""
    model = _checkpointing_model()
    enable_gradient_checkpointing(model)
    mtp_model.unpatch(model).train()
    assert not any(getattr(layer, "gradient_checkpointing", False) for layer in model.model.layers)
    ids = torch.randint(3, 40, (2, 10), generator=torch.Generator().manual_seed(7))
    model(input_ids=ids, labels=ids).loss.backward()


def test_batches_past_a_sliding_window_are_refused():
    model = mtp_model.patch(tiny_model("mistral", sliding_window=16), mtp_model.MTPConfig(num_masks=2, lora_rank=4))
    collator = MTPDataCollator(2, 96)
    mtp_loss(model, collator(counting_examples(2, 96, length=15)))  # positions 0..15: within the window
    with pytest.raises(ValueError, match="sliding window of 16 tokens"):
        mtp_loss(model, collator(counting_examples(2, 96, length=16)))


def test_batches_that_reach_a_rescaling_rotary_embedding_are_refused():
    rope = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}
    model = mtp_model.patch(tiny_model(max_position_embeddings=20, rope_parameters=rope),
                            mtp_model.MTPConfig(num_masks=2, lora_rank=4))
    collator = MTPDataCollator(2, 96)
    mtp_loss(model, collator(counting_examples(2, 96, length=12)))  # the layout's positions stay below 20
    with pytest.raises(ValueError, match="rotary embedding changes its frequencies from 20 positions"):
        mtp_loss(model, collator(counting_examples(2, 96, length=19)))


def test_transformers_own_checkpointing_is_refused():
    model = _checkpointing_model()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()  # recomputes layers without the gate: the loss must not train under it
    model.train()
    with pytest.raises(RuntimeError, match="enable_gradient_checkpointing"):
        mtp_loss(model, MTPDataCollator(2, 40)(counting_examples(2, 40, seed=7)))


def test_flex_attention_block_mask_matches_the_dense_mask():
    pytest.importorskip("torch.nn.attention.flex_attention")
    batch = MTPDataCollator(3, 40)(counting_examples(2, 40, seed=8, length=10, prompt=3))
    losses = {}
    for implementation in ("sdpa", "flex_attention"):
        model = tiny_model(seed=8, vocab_size=40, attn_implementation=implementation)
        randomize_adapter(mtp_model.patch(model, mtp_model.MTPConfig(num_masks=3, lora_rank=4)))
        with torch.no_grad():
            losses[implementation] = mtp_loss(model, batch)[1]
    for term, value in losses["sdpa"].items():
        assert abs(losses["flex_attention"][term] - value) < 1e-4, term


@pytest.mark.slow
def test_data_parallel_training_keeps_the_ranks_in_step(tmp_path):
    """Two processes under torchrun (DDP over gloo on CPU) see different examples; identical adapters on
    both ranks afterwards mean every step averaged the gradients across ranks."""
    worker = Path(__file__).with_name("ddp_training_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
               str(tmp_path)]
    try:
        finished = subprocess.run(command, capture_output=True, text=True, timeout=180)  # ~10 s here
    except subprocess.TimeoutExpired as hang:  # each rank dumps its Python stacks after 150 s
        stderr = hang.stderr.decode(errors="replace") if isinstance(hang.stderr, bytes) else hang.stderr or ""
        pytest.fail(f"torchrun hung for 180 s; the ranks' stacks:\n{stderr[-6000:]}")
    assert finished.returncode == 0, finished.stderr[-4000:]
    initial, rank0, rank1 = (load_file(tmp_path / f"{name}.safetensors") for name in ("initial", "rank0", "rank1"))
    assert rank0.keys() == rank1.keys() == initial.keys() and len(rank0) > 0
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(rank0[name], initial[name]) for name in rank0)
