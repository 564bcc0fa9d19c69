"""Run under torchrun by `test_training.test_data_parallel_training_keeps_the_ranks_in_step`.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_training_worker.py OUT

Every rank builds the same tiny patched model, MTPTrainer trains it for a few steps with DDP on CPU
(gloo), each rank on its own share of the data, and writes its trainable parameters to
OUT/rank{R}.safetensors (rank 0 also writes OUT/initial.safetensors, before training).
"""

import faulthandler
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import TrainingArguments

sys.path.insert(0, str(Path(__file__).parent))
from helpers import counting_examples, randomize_adapter, tiny_model  # noqa: E402

import mtp_model  # noqa: E402
from mtp_model.training import MTPDataCollator, MTPTrainer, end_distributed_process  # noqa: E402


def trainable(model):
    return {name: p.detach().clone().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def main(out: Path):
    faulthandler.dump_traceback_later(150)  # a hang prints every thread's stack (the test reports them)
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    model = randomize_adapter(mtp_model.patch(tiny_model(seed=3, vocab_size=40),
                                              mtp_model.MTPConfig(num_masks=2, lora_rank=4)))
    if rank == 0:
        save_file(trainable(model), out / "initial.safetensors")
    args = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        save_strategy="no", report_to=[], use_cpu=True, ddp_backend="gloo", remove_unused_columns=False,
        disable_tqdm=True, seed=0,
    )
    trainer = MTPTrainer(model=model, args=args, train_dataset=counting_examples(32, 40, seed=3),
                         data_collator=MTPDataCollator(2, 40))
    trainer.train()
    assert trainer.args.world_size == 2, trainer.args.world_size
    save_file(trainable(model), out / f"rank{rank}.safetensors")
    end_distributed_process()  # as `mtp train` ends: gloo's own teardown can deadlock (its docstring)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
