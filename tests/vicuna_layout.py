"""A tiny stand-in for Vicuna-7B with FasterDecoding heads, in the same on-disk formats: a Llama
with a SentencePiece-style tokenizer (Metaspace '▁', byte fallback, <s> prepended) and heads with
their own lm_heads in `medusa_lm_head.pt` (bf16, as released)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from medusa_model import HeadsConfig, MedusaHeads

TRAINING_TEXT = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions. USER: Where is the station? "
                 "ASSISTANT: The station is near the market.\n    def f(x):\n        return x + 1\n")
TEXT = "USER: Où est le café? ASSISTANT: près de la gare — 東京 🚀 naïve déjà vu.\n    def f(x):\n  return x\n"


def llama_style_tokenizer() -> PreTrainedTokenizerFast:
    """Like Llama's tokenizer.json: Metaspace, byte fallback, and a decoder that strips the first space."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([TRAINING_TEXT] * 4, trainer)  # ASCII only: other characters fall back to bytes
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<0x{i:02X}>": len(vocab) + i for i in range(256)})  # byte tokens are ordinary tokens
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def memorise(model: LlamaForCausalLM, ids: torch.Tensor, steps: int = 150) -> None:
    """Overfit the model on one text, so that greedy decoding from its start recites it: output with
    spaces, newlines and multi-byte characters split over byte tokens."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def write_vicuna_layout(root: Path) -> tuple[Path, Path]:
    """(model folder, heads folder)."""
    tokenizer = llama_style_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    memorise(model, tokenizer(TEXT + "</s>", return_tensors="pt")["input_ids"])
    model.save_pretrained(root / "vicuna")
    tokenizer.save_pretrained(root / "vicuna")
    heads = MedusaHeads(HeadsConfig(3), config.hidden_size, config.vocab_size)
    heads.init_lm_heads(model.lm_head)
    (root / "heads").mkdir()
    torch.save({k: v.to(torch.bfloat16) for k, v in heads.state_dict().items()}, root / "heads" / "medusa_lm_head.pt")
    (root / "heads" / "config.json").write_text(json.dumps(
        {"medusa_num_heads": 2, "medusa_num_layers": 1, "base_model_name_or_path": "lmsys/vicuna-7b-v1.3"}))
    return root / "vicuna", root / "heads"
