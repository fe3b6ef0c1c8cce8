#!/usr/bin/env python3
"""Build a tiny random Llama model (plus tokenizer and chat template) that vLLM can serve.

Run it with the vLLM venv's python (it needs torch, transformers and tokenizers):

    HF_HUB_OFFLINE=1 <venv>/bin/python scripts/make_tiny_model.py OUTDIR [--seed N] [--force]

Nothing is downloaded. The weights are random (the model answers junk text), but the model
is a real LlamaForCausalLM checkpoint: ~2 MB split into ~10 safetensors shards so that vLLM's
shard-loading progress is visible. head_dim is 64 (128 hidden / 2 heads): vLLM's CPU attention
rejects head_dim 16.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

VOCAB_SIZE = 512
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

WORDS = (
    "the a an model server switch engine token cache memory load weight shard health "
    "request answer question hello world tiny llama fast slow ready sleep wake start stop "
    "user assistant system chat prompt reply text data batch queue port host local cpu gpu "
    "one two three four five six seven eight nine ten is are was be can will not and or "
    "with from into for of to in on at by this that it we you they what why how when where"
).split()


def corpus(seed: int, lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        sentence = " ".join(words).capitalize() + rng.choice([".", "?", "!", ","])
        if rng.random() < 0.2:
            sentence += f" {rng.randint(0, 9999)}"
        out.append(sentence)
    return out


def build_tokenizer(seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS, PAD, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    if len(fast) > VOCAB_SIZE:
        raise SystemExit(f"tokenizer has {len(fast)} tokens > vocab_size {VOCAB_SIZE}")
    return fast


def build_model(seed: int, tokenizer):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", default="200KB", help="max_shard_size for save_pretrained")
    parser.add_argument("--force", action="store_true", help="replace OUTDIR if it exists")
    args = parser.parse_args(argv)

    out: Path = args.outdir.expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not args.force:
        print(f"{out} exists and is not empty (use --force to replace it)", file=sys.stderr)
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(args.seed)
    model = build_model(args.seed, tokenizer)

    # Write next to OUTDIR, then swap in, so a half-written model is never left at OUTDIR.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, max_shard_size=args.shard_size, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # mkdtemp makes a 0700 dir and some writers 0600 files: use the usual umask modes.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {out}: {n_params} params, {len(shards)} safetensors shards, "
        f"vocab {len(tokenizer)}/{VOCAB_SIZE}, seed {args.seed}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
