"""The Hugging Face Trainer: trainprobe's probes inside ``trainer.train()`` with one callback.

A 2-layer GPT-2 (``n_embd=16``, built from a config: nothing is downloaded) learns generated
sequences that count up modulo the vocabulary from a random start, with gradient
accumulation and clipping. ``TrainprobeCallback`` records the default probes plus the
sharpness once per optimizer step. The Trainer clips before the first event that follows
the backward pass, so the gradient probes read the clipped gradient; the pre-clip norm the
Trainer logs is stored as ``scalars/grad_norm_preclip`` at the steps it logs
(``logging_steps=1`` here: every step, next to ``norms/grad_total``). Needs
``pip install "trainprobe[hf]"``; runs in seconds on a CPU.

    python examples/hf_trainer.py [--out runs/hf_trainer] [--steps 200]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PrinterCallback, Trainer, TrainingArguments

import trainprobe
from trainprobe import Sharpness, default_probes, every
from trainprobe.integrations.hf import TrainprobeCallback

VOCAB, LENGTH = 32, 16


def make_data(n: int, gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """``n`` sequences ``s, s+1, ... (mod VOCAB)``, each ``[LENGTH]`` ids, its own labels."""
    starts = torch.randint(0, VOCAB, (n, 1), generator=gen)
    ids = (starts + torch.arange(LENGTH)) % VOCAB  # [n, LENGTH]
    return [{"input_ids": row, "labels": row} for row in ids]


def main(out: Path, steps: int = 200) -> trainprobe.Run:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=LENGTH, n_embd=16, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    # AdamW's sharpness is preconditioned: defined from its first step on
    probes = [*default_probes(), Sharpness(schedule=every(50, start=50))]
    callback = TrainprobeCallback(probes, run_dir=out, overwrite=True)  # loss: model(**inputs)
    with tempfile.TemporaryDirectory() as scratch:  # the Trainer's output_dir (unused)
        args = TrainingArguments(
            output_dir=scratch,
            max_steps=steps,
            per_device_train_batch_size=16,
            gradient_accumulation_steps=2,  # one record per optimizer step
            learning_rate=3e-3,
            max_grad_norm=1.0,  # clipped before the probes read the gradient
            logging_steps=1,  # the trainer's loss and pre-clip norm at every step
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
        )
        data = make_data(2048, torch.Generator().manual_seed(0))
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
        trainer.remove_callback(PrinterCallback)  # no line printed per logged step
        with callback:  # an error in training closes the run as failed, hooks removed
            trainer.train()

    run = trainprobe.Run(out)
    loss = run.series("scalars/loss").values
    print(f"run: {out} ({run.meta['status']}); loss {loss[0]:.3f} -> {loss[-1]:.3f}")
    print(f"gradient measured: {run.meta['user']['integration']['gradient']}")
    print(f"findings and the dashboard: trainprobe report {out}")
    return run


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/hf_trainer"))
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    main(args.out, args.steps)
