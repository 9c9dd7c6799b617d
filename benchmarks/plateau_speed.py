"""Training-step time of the plateau model vs the official code's backbone (HF GPT-2).

The official code of Fu et al. trains a Hugging Face ``GPT2Model`` with linear read-in and
read-out; ``anchor_lens.plateau`` uses a hand-written ``PlateauTransformer`` with TransformerLens
hook points. Both are timed here on the same task, size and batch, one optimizer step (forward,
backward, Adam) at a time, in the same process. (A TransformerBridge around the GPT-2 adds its
own overhead on top of the GPT-2's: see the TransformerLens notes.)

    .venv/bin/python benchmarks/plateau_speed.py [--steps 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn


def _gpt2(cfg, d_in: int, d_out: int) -> nn.Module:
    from transformers import GPT2Config, GPT2Model

    class HFModel(nn.Module):
        def __init__(self):
            super().__init__()
            config = GPT2Config(
                n_positions=cfg.n_ctx,
                n_embd=cfg.d_model,
                n_layer=cfg.n_layers,
                n_head=cfg.n_heads,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                use_cache=False,
            )
            config._attn_implementation = "eager"  # what hooks on attention patterns need
            self.read_in = nn.Linear(d_in, cfg.d_model)
            self.backbone = GPT2Model(config)
            self.read_out = nn.Linear(cfg.d_model, d_out)

        def forward(self, inputs):
            h = self.backbone(inputs_embeds=self.read_in(inputs)).last_hidden_state
            return self.read_out(h)

    return HFModel()


def _time(model: nn.Module, task, steps: int, batch_size: int) -> float:
    from anchor_lens.plateau import encode_pairs

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    batches = [task.sample(batch_size, g) for _ in range(steps + 5)]
    times = []
    for i, b in enumerate(batches):
        start = time.perf_counter()
        out = model(encode_pairs(b.x, b.y, task.n_values))[:, ::2, : task.n_values]
        loss = nn.functional.cross_entropy(out.flatten(0, 1), b.y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 5:  # warm-up steps are not timed
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    from anchor_lens.plateau import FactorTask, PlateauModelConfig, build_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = FactorTask(n_factors=3, n_values=4, n_maps=1000, n_pairs=16)
    for size in (PlateauModelConfig(2, 32, 4), PlateauModelConfig(2, 64, 4)):
        ours = build_model(task, size)
        theirs = _gpt2(ours.cfg, ours.cfg.d_in, ours.cfg.n_out + ours.cfg.n_aux)
        t_ours = _time(ours, task, args.steps, args.batch_size)
        t_hf = _time(theirs, task, args.steps, args.batch_size)
        print(
            f"{size.n_layers} layers, d_model {size.d_model}, batch {args.batch_size} x "
            f"{2 * task.n_pairs} tokens, {args.threads} thread(s): PlateauTransformer "
            f"{1000 * t_ours:.1f} ms/step, HF GPT-2 {1000 * t_hf:.1f} ms/step "
            f"({t_hf / t_ours:.2f}x)"
        )


if __name__ == "__main__":
    main()
