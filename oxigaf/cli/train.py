"""``oxigaf train``: train or fine-tune the multi-view UNet on a folder of subjects."""

from __future__ import annotations

import argparse

from ..config import ATTENTION_MODES


def add_parser(sub) -> argparse.ArgumentParser:
    tr = sub.add_parser("train", help="train / fine-tune the multi-view UNet on a folder of subjects")
    tr.add_argument("data", help="folder of subjects (each a folder with transforms.json and its images)")
    tr.add_argument("--model", required=True, help="starting pipeline folder or hub id (ImageDream / MVDream layout)")
    tr.add_argument("-o", "--output", required=True, help="output pipeline folder (unet/, checkpoints/, log)")
    tr.add_argument("--steps", type=int, default=1000, help="optimiser steps to run (--resume: this many more)")
    tr.add_argument("--batch-size", type=int, default=1, help="samples per micro-batch (default 1)")
    tr.add_argument("--grad-accumulation", type=int, default=1, help="micro-batches per optimiser step (default 1)")
    tr.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    tr.add_argument("--warmup", type=int, default=0, help="linear warm-up steps (default 0)")
    tr.add_argument("--weight-decay", type=float, default=0.01)
    tr.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off; default 1)")
    tr.add_argument("--ema", type=float, default=None, help="EMA decay of the exported weights (e.g. 0.999)")
    tr.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0: every weight)")
    tr.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    tr.add_argument("--init-in-channels", type=int, default=None,
                    help="widen the UNet input to C channels (8: normal-map conditioning; new weights zero)")
    tr.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output")
    tr.add_argument("--backend", default="auto", help="torch, mlx or auto (default)")
    tr.add_argument("--device", default=None, help="backend device: cpu, cuda, cuda:1, mps, gpu")
    tr.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--views", type=int, default=4, help="target views per sample (default 4)")
    tr.add_argument("--size", type=int, default=None, help="training resolution in pixels (default: the model's)")
    tr.add_argument("--image-dropout", type=float, default=0.1, help="CFG image-condition dropout (default 0.1)")
    tr.add_argument("--text-dropout", type=float, default=0.1, help="CFG text dropout (default 0.1)")
    tr.add_argument("--reference-frame", type=int, default=None,
                    help="use this frame of every subject as the reference (default: a random frame per sample)")
    tr.add_argument("--checkpoint-every", type=int, default=500)
    tr.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    tr.add_argument("--attention", default="auto", choices=ATTENTION_MODES)
    tr.add_argument("--quiet", action="store_true", help="no progress bars")
    return tr


def run(args) -> int:
    from ..training import TrainConfig, Trainer

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accumulation=args.grad_accumulation,
                      lr=args.lr, warmup_steps=args.warmup, weight_decay=args.weight_decay,
                      max_grad_norm=args.max_grad_norm or None, ema_decay=args.ema, lora_rank=args.lora_rank,
                      lora_alpha=args.lora_alpha, init_in_channels=args.init_in_channels, dtype=args.dtype,
                      seed=args.seed, views=args.views, size=args.size, image_dropout=args.image_dropout,
                      text_dropout=args.text_dropout, checkpoint_every=args.checkpoint_every,
                      grad_checkpointing=args.gradient_checkpointing, attention=args.attention,
                      reference_frame=args.reference_frame, progress=not args.quiet)
    trainer = Trainer(args.data, args.model, args.output, cfg, backend=args.backend, device=args.device,
                      resume=args.resume)
    out = trainer.train()
    print(f"trained {cfg.steps} steps; wrote {out} (unet/{', lora/' if cfg.lora_rank else ''}, "
          f"training_log.jsonl, checkpoints/)")
    return 0
