"""FasterDecoding-layout heads: round trips, strict loading with a clear error per mismatch, the Hub
path (through huggingface_hub's own cache, offline) and the command line."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine.decode import Engine
from engine.messages import Request
from engine.tree import preset
from load_medusa_from_hf import HeadsError, load_medusa_heads, load_medusa_model, save_medusa_heads
from medusa_model import HeadsConfig, MedusaHeads

H, V = 16, 40
ROOT = Path(__file__).resolve().parents[2]


def random_heads(num_heads=3, num_layers=2, shares=False) -> MedusaHeads:
    torch.manual_seed(0)
    heads = MedusaHeads(HeadsConfig(num_heads, num_layers, shares), H, V)
    for p in heads.parameters():
        p.data.normal_()
    return heads


def write(folder: Path, state: dict, config: dict, file="medusa_lm_head.safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    (save_file if file.endswith(".safetensors") else torch.save)(state, folder / file)
    return folder


def faster_decoding_state(num_heads=5, num_layers=1) -> dict[str, torch.Tensor]:
    """Keys as FasterDecoding's MedusaModel saves them."""
    state = {}
    for i in range(num_heads):
        for j in range(num_layers):
            state[f"{i}.{j}.linear.weight"] = torch.randn(H, H, dtype=torch.bfloat16)
            state[f"{i}.{j}.linear.bias"] = torch.randn(H, dtype=torch.bfloat16)
        state[f"{i}.{num_layers}.weight"] = torch.randn(V, H, dtype=torch.bfloat16)
    return state


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "pt"])
@pytest.mark.parametrize("shares", [False, True], ids=["own-lm-head", "version-2"])
def test_round_trip(tmp_path, safetensors, shares):
    heads = random_heads(shares=shares)
    save_medusa_heads(heads, tmp_path, base_model="base", safetensors=safetensors)
    name = "medusa_lm_head.safetensors" if safetensors else "medusa_lm_head.pt"
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", name}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["medusa_num_heads"] == 3 and config["medusa_num_layers"] == 2
    assert config.get("version") == ("2" if shares else None)
    loaded = load_medusa_heads(str(tmp_path), H, V)
    assert loaded.config == heads.config
    for (k, a), (k2, b) in zip(heads.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    lm_head = torch.nn.Linear(H, V, bias=False)
    x = torch.randn(2, H)
    torch.testing.assert_close(loaded(x, lm_head), heads(x, lm_head))


@pytest.mark.parametrize("shares", [False, True], ids=["own-lm-head", "version-2"])
def test_round_trip_with_a_truncated_vocabulary(tmp_path, shares):
    """vLLM's layout: `token_map` in the weights, `truncated_vocab_size` in the config."""
    torch.manual_seed(0)
    heads = MedusaHeads(HeadsConfig(2, 1, shares, truncated_vocab_size=8), H, V)
    lm_head = torch.nn.Linear(H, V, bias=False)
    token_map = torch.tensor([0, 3, 5, 8, 13, 21, 34, 39])
    heads.init_lm_heads(lm_head, token_map)
    save_medusa_heads(heads, tmp_path, base_model="base")
    assert json.loads((tmp_path / "config.json").read_text())["truncated_vocab_size"] == 8
    loaded = load_medusa_heads(str(tmp_path), H, V)
    assert loaded.config == heads.config and torch.equal(loaded.token_map, token_map)
    x = torch.randn(2, H)
    assert loaded(x, lm_head).shape == (2, 2, 8)
    torch.testing.assert_close(loaded(x, lm_head), heads(x, lm_head))
    if not shares:  # a copy of the base lm_head's rows, as the heads start
        torch.testing.assert_close(loaded[0][-1].weight, lm_head.weight[token_map])
    assert set(loaded.token_ids(torch.arange(8)).tolist()) == set(token_map.tolist())
    assert loaded.rows_of(torch.tensor([21, 1])).tolist() == [5, -100]


@pytest.mark.parametrize("case, message", [
    ("no token_map", "truncated_vocab_size 8, the file holds no token_map"),
    ("no config", "truncated_vocab_size None, the file holds a token_map of 8"),
    ("sizes differ", "truncated_vocab_size 7, the file holds a token_map of 8"),
    ("outside the vocabulary", "token_map must hold int64 token ids below 40"),
])
def test_a_truncated_vocabulary_that_does_not_add_up_is_refused(tmp_path, case, message):
    heads = MedusaHeads(HeadsConfig(2, 1, True, truncated_vocab_size=8), H, V)
    save_medusa_heads(heads, tmp_path, base_model="base")
    config, state = json.loads((tmp_path / "config.json").read_text()), dict(heads.state_dict())
    if case == "no token_map":
        del state["token_map"]
    elif case == "no config":
        del config["truncated_vocab_size"]
    elif case == "sizes differ":
        config["truncated_vocab_size"] = 7
    else:
        state["token_map"] = torch.arange(8) + 35
    write(tmp_path, state, config)
    with pytest.raises(HeadsError, match=message):
        load_medusa_heads(str(tmp_path), H, V)


def test_released_layout_counts_heads_from_the_file(tmp_path, caplog):
    """The released Vicuna-7B heads: config says 2 heads, the bf16 .pt holds 5."""
    state = faster_decoding_state(num_heads=5)
    config = {"medusa_num_heads": 2, "medusa_num_layers": 1, "base_model_name_or_path": "lmsys/vicuna-7b-v1.3"}
    write(tmp_path, state, config, "medusa_lm_head.pt")
    with caplog.at_level(logging.WARNING):
        heads = load_medusa_heads(str(tmp_path), H, V)
    assert len(heads) == 5
    assert "says 2 heads, the weights hold 5" in caplog.text
    torch.testing.assert_close(heads[4][1].weight.to(torch.bfloat16), state["4.1.weight"])


def mutate(state: dict, config: dict, case: str) -> tuple[dict, dict, int, int]:
    hidden, vocab = H, V
    if case == "hidden size":
        hidden = H + 1
    elif case == "vocabulary":
        vocab = V + 1
    elif case == "missing key":
        del state["1.0.linear.bias"]
    elif case == "unexpected key":
        state["0.0.extra.weight"] = torch.zeros(1)
    elif case == "layer count":
        config["medusa_num_layers"] = 2
    elif case == "version 2 with lm_heads":
        config["version"] = "2"
    elif case == "wrong shape":
        state["2.0.linear.weight"] = torch.zeros(H, H - 1)
    return state, config, hidden, vocab


@pytest.mark.parametrize(
    "case, message",
    [
        ("hidden size", "hidden size 16, the base model 17"),
        ("vocabulary", "vocabulary of 40, the base model 41"),
        ("missing key", r"Missing key\(s\).*1\.0\.linear\.bias"),
        ("unexpected key", r"unexpected keys \['0\.0\.extra\.weight'\]"),
        ("layer count", "config says 2 layers per head, the file holds 1"),
        ("version 2 with lm_heads", "version 2"),
        ("wrong shape", r"size mismatch for 2\.0\.linear\.weight"),
    ],
)
def test_each_mismatch_has_its_error(tmp_path, case, message):
    config = {"medusa_num_heads": 3, "medusa_num_layers": 1}
    state, config, hidden, vocab = mutate(faster_decoding_state(3), config, case)
    write(tmp_path, state, config)
    with pytest.raises(HeadsError, match=message):
        load_medusa_heads(str(tmp_path), hidden, vocab)


def test_missing_files(tmp_path):
    with pytest.raises(HeadsError, match="no config.json"):
        load_medusa_heads(str(tmp_path), H, V)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(HeadsError, match="no medusa_lm_head.safetensors or medusa_lm_head.pt"):
        load_medusa_heads(str(tmp_path), H, V)
    with pytest.raises(HeadsError, match="not a folder"):
        load_medusa_heads(str(tmp_path / "absent"), H, V)


def hub_cache(tmp_path: Path, repo: str) -> Path:
    """A huggingface_hub cache holding one snapshot of `repo`, as a download would leave it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    storage = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    save_medusa_heads(random_heads(num_heads=2, num_layers=1), storage / "snapshots" / commit, base_model="b")
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)
    return tmp_path / "hub"


def test_hub_id_through_huggingface_hub_offline(tmp_path):
    cache = hub_cache(tmp_path, "someone/medusa-heads")
    heads = load_medusa_heads("someone/medusa-heads", H, V, cache_dir=str(cache))
    assert len(heads) == 2


def test_command_line_prints_the_shape(tmp_path):
    cache = hub_cache(tmp_path, "someone/medusa-heads")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    out = subprocess.run(
        [sys.executable, str(ROOT / "load_medusa_from_hf.py"), "someone/medusa-heads"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout
    assert "heads       2 (config.json says 2)" in out
    assert "hidden size 16" in out and "own, vocab 40" in out


def test_served_model_loads_from_folders(tmp_path, toy, prompts):
    """Base model, tokenizer and heads saved as Hugging Face folders load back and decode the same."""
    model, tokenizer = toy
    model.model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    save_medusa_heads(model.heads, tmp_path / "heads", base_model=str(tmp_path / "model"))
    loaded, loaded_tokenizer = load_medusa_model(str(tmp_path / "model"), str(tmp_path / "heads"), deepspeed=False)
    assert loaded.num_heads == model.num_heads
    reqs = [Request(str(i), p, max_new_tokens=24) for i, p in enumerate(prompts)]
    again = Engine(loaded, loaded_tokenizer, tree=preset("tree15")).generate(reqs)
    first = Engine(model, tokenizer, tree=preset("tree15")).generate(reqs)
    assert [s.tokens for s in again] == [s.tokens for s in first]
    assert [s.decode_steps for s in again] == [s.decode_steps for s in first]


def test_heads_that_read_the_root_token_round_trip_and_start_as_plain_heads(tmp_path):
    """`root` [K, H, H] in the weights, `reads_root_token` in the config; at zero (as trained heads
    start) they give the plain heads' logits, and with weights they depend on the root token."""
    torch.manual_seed(0)
    plain = MedusaHeads(HeadsConfig(2, 1, True), H, V)
    for p in plain.parameters():
        p.data.normal_()
    heads = MedusaHeads(HeadsConfig(2, 1, True, reads_root_token=True), H, V)
    heads.load_state_dict(plain.state_dict(), strict=False)
    lm_head, x, root = torch.nn.Linear(H, V, bias=False), torch.randn(3, H), torch.randn(3, H)
    torch.testing.assert_close(heads(x, lm_head, root), plain(x, lm_head))
    with pytest.raises(ValueError, match="read the root token"):
        heads(x, lm_head)
    heads.root.data.normal_()
    save_medusa_heads(heads, tmp_path, base_model="base")
    assert json.loads((tmp_path / "config.json").read_text())["reads_root_token"] is True
    loaded = load_medusa_heads(str(tmp_path), H, V)
    assert loaded.config == heads.config and torch.equal(loaded.root, heads.root)
    torch.testing.assert_close(loaded(x, lm_head, root), heads(x, lm_head, root))
    assert not torch.allclose(loaded(x, lm_head, root), loaded(x, lm_head, root.flip(0)))


@pytest.mark.parametrize("case", ["config without weights", "weights without config"])
def test_a_root_projection_that_the_config_does_not_match_is_refused(tmp_path, case):
    heads = MedusaHeads(HeadsConfig(2, 1, True, reads_root_token=True), H, V)
    save_medusa_heads(heads, tmp_path, base_model="base")
    config, state = json.loads((tmp_path / "config.json").read_text()), dict(heads.state_dict())
    if case == "config without weights":
        del state["root"]
    else:
        del config["reads_root_token"]
    write(tmp_path, state, config)
    with pytest.raises(HeadsError, match="reads_root_token"):
        load_medusa_heads(str(tmp_path), H, V)
