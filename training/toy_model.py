"""A seeded random Llama with a byte-level BPE tokenizer and heads self-distilled on its own greedy
output: a model whose heads really get accepted, built in seconds without any download.

Tests and bench/bench_engine.py use it.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from medusa_model import HeadsConfig, MedusaHeads, MedusaModel
from training.train_medusa import MedusaTrainer, greedy_continuations, head_targets

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]


def stdlib_texts(limit: int) -> list[str]:
    """Python sources of the standard library: text every machine with Python has."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:limit]
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer that prepends <s>, as Llama's does."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )


@dataclass(frozen=True)
class ToyShape:
    vocab_size: int = 384
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2  # grouped-query attention, as in larger Llamas
    context: int = 256
    medusa_heads: int = 4
    seed: int = 0
    init_std: float = 0.01  # small weights: greedy text that heads can learn to predict


def build_toy(shape: ToyShape = ToyShape(), train_steps: int = 400):
    """Returns (MedusaModel without DeepSpeed, tokenizer) with heads trained on the model's greedy text."""
    torch.manual_seed(shape.seed)
    texts = stdlib_texts(40)
    tokenizer = train_tokenizer(texts, shape.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.hidden_size * 3,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.context,
        initializer_range=shape.init_std,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    base = LlamaForCausalLM(config).eval()
    heads = MedusaHeads(HeadsConfig(shape.medusa_heads), config.hidden_size, config.vocab_size)
    heads.init_lm_heads(base.lm_head)
    model = MedusaModel(base, heads.eval())
    train_heads(model, tokenizer("\n".join(texts))["input_ids"], train_steps)
    return model, tokenizer


def train_heads(model: MedusaModel, corpus: list[int], steps: int, prompts: int = 512, batch: int = 16) -> None:
    """Self-distillation: heads learn the base model's greedy continuations of 8-token snippets."""
    g = torch.Generator().manual_seed(1)
    starts = torch.randint(0, len(corpus) - 8, (prompts,), generator=g).tolist()
    data = torch.tensor(greedy_continuations(model.model, [corpus[s : s + 8] for s in starts], 56))  # [N, 64]
    trainer = MedusaTrainer(model, total_steps=steps, lr=1e-2)
    hidden = trainer.hidden(data)  # the base is frozen: its hidden states are computed once
    targets = head_targets(data, model.num_heads)
    for _ in range(steps):
        pick = torch.randint(0, len(data), (batch,), generator=g)
        trainer.fit(hidden[pick], targets[pick])
