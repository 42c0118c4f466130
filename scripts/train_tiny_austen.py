"""Train models/tiny-austen: a MiniCPM4-architecture model (muP, tied embeddings, InfLLM v2 sparse_config) on five
Jane Austen novels, on this machine's CPU, in well under an hour. Persuasion stays held out for evaluation.

    .venv/bin/python scripts/train_tiny_austen.py --out models/tiny-austen

Steps: train a byte-level BPE tokenizer (`tokenizers`) on the training split, tokenize, train our own
`export.nn.CausalLM` (cache-free causal path) with AdamW + cosine schedule, write the checkpoint in the exact
upstream layout (config.json, model.safetensors, tokenizer files) plus train_log.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pocketllm.export.atomic import atomic_directory
from pocketllm.export.checkpoint_writer import write_weights
from pocketllm.export.families import get_family
from pocketllm.export.init_checkpoint import build_tokenizer
from pocketllm.export.tokenizer import write_tokenizer
from pocketllm.export.nn.decoder import CausalLM
from pocketllm.export.families.minicpm4.presets import minicpm4_config
from pocketllm.export.families import spec_from_config

AUSTEN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "austen"
TRAIN_BOOKS = ("sensesensibility.txt", "prideprejudice.txt", "mansfieldpark.txt", "emma.txt", "northangerabbey.txt")
HELD_OUT = "persuasion.txt"

CONFIG = dict(
    vocab_size=8192, hidden_size=256, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
    intermediate_size=768, max_position_embeddings=1024, tie_word_embeddings=True,
    # InfLLM v2 scaled down: 64-token blocks, 128-token local window, topk 4 (6 blocks = 384 tokens
    # per query), dense below 384 tokens, so sparse attention engages beyond a few hundred tokens.
    sparse_config={"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64, "window_size": 128,
                   "topk": 4, "use_nope": False, "dense_len": 384},
    bos_token_id=1, eos_token_id=(2, 4),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("models/tiny-austen"))
    ap.add_argument("--data", type=Path, default=AUSTEN)
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t_start = time.time()

    texts = [(args.data / b).read_text(encoding="utf-8") for b in TRAIN_BOOKS]
    names = list(get_family("minicpm4").tokenizer.specials)
    tokenizer = build_tokenizer(CONFIG["vocab_size"], names, texts)
    bos = tokenizer.token_to_id("<s>")
    assert bos == CONFIG["bos_token_id"], "special token ids must match the config"
    stream = np.concatenate([np.asarray(tokenizer.encode(t).ids, dtype=np.int64) for t in texts])
    print(f"tokenizer: {tokenizer.get_vocab_size()} tokens; training stream: {len(stream):,} tokens", flush=True)

    config = minicpm4_config(**CONFIG)
    config["dim_model_base"] = 64  # logits scaled by 1 / (256 / 64) = 1/4, like the 0.5B model
    config["torch_dtype"] = "float32"
    config["rope_scaling"] = None
    spec = spec_from_config(config)
    model = CausalLM(spec, args.seq)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)

    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warmup = max(args.steps // 20, 1)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(args.steps - warmup, 1)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    rng = np.random.default_rng(args.seed)
    log = []
    model.train()
    t_train = time.time()
    for step in range(args.steps):
        starts = rng.integers(0, len(stream) - args.seq, size=args.batch)
        body = np.stack([stream[s:s + args.seq] for s in starts])
        x = torch.from_numpy(np.concatenate([np.full((args.batch, 1), bos), body[:, :-1]], axis=1))
        y = torch.from_numpy(body)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        logits = model(x, None)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        log.append(loss.item())
        if step % 20 == 0 or step == args.steps - 1:
            elapsed = time.time() - t_train
            tok_s = (step + 1) * args.batch * args.seq / elapsed
            print(f"step {step:4d}  loss {np.mean(log[-20:]):.3f}  lr {lr_at(step):.2e}  {tok_s:.0f} tok/s  "
                  f"{elapsed / 60:.1f} min", flush=True)
    train_seconds = time.time() - t_train

    model.eval()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_directory(args.out, force=args.force) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_tokenizer(tmp, "minicpm4", tokenizer)
        write_weights(tmp, state.items(), total_bytes=0)
        (tmp / "train_log.json").write_text(json.dumps({
            "parameters": n_params, "steps": args.steps, "batch": args.batch, "seq": args.seq, "lr": args.lr,
            "training_tokens": args.steps * args.batch * args.seq, "stream_tokens": int(len(stream)),
            "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - t_start, 1),
            "threads": args.threads, "final_loss": float(np.mean(log[-50:])),
            "loss_every_20_steps": [round(float(np.mean(log[i:i + 20])), 4) for i in range(0, len(log), 20)],
        }, indent=2) + "\n")
    print(f"wrote {args.out} in {(time.time() - t_start) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
