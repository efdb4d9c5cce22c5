"""What the service serves: the model, heads, tree and engine the settings describe, built in the
engine process, and the facts about them that the HTTP process needs (a ServedInfo, sent to it once
loaded)."""

from __future__ import annotations

import hashlib
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

import medusa_model
from config.settings import Settings
from engine import decode, int4
from engine.adaptive import CostTable, TreeChooser, nested_family
from engine.calibration import cost_table
from engine.decode import Engine
from engine.int4 import NATIVE_SOURCE, Int4Llama
from engine.messages import ServedInfo
from engine.tree import ROOT, Tree, load_tree, preset
from load_medusa_from_hf import heads_tree, load_medusa_model

COST_SCHEMA = 2  # how cost tables are measured: a new value retires the tables cached before it


@dataclass
class Served:
    engine: Engine
    tree: Tree
    deepspeed: bool

    def info(self) -> ServedInfo:
        """Called in the engine process: the thread count is that process's own."""
        e = self.engine
        threads = torch.get_num_threads() if e.model.device.type == "cpu" else None
        return ServedInfo(e.tokenizer, e.model.num_heads, self.tree.describe(), str(e.model.device),
                          str(e.model.dtype).removeprefix("torch."), self.deepspeed, e.cuda_graphs, e.max_batch_size,
                          e.max_context, e.model.config.vocab_size, threads, e.chooser is not None, e.model.weights)


def load_served(settings: Settings) -> Served:
    """The model, heads, tree and engine the settings describe."""
    dtype = getattr(torch, settings.resolved_dtype())
    model, tokenizer = load_medusa_model(settings.model_name, settings.heads(), device=settings.resolved_device(),
                                         dtype=dtype, deepspeed=settings.deepspeed, tp_size=settings.resolved_tp_size(),
                                         revision=settings.revision, quantize=settings.quantize)
    if settings.resolved_device() == "cpu":  # after loading: the rule depends on the weights served
        torch.set_num_threads(settings.resolved_cpu_threads(isinstance(model.runner, Int4Llama)))
    tree = choose_tree(settings, model.num_heads)
    engine = Engine(model, tokenizer, tree=tree, max_batch_size=settings.max_batch_size, max_context=settings.max_context,
                    cuda_graphs=settings.cuda_graphs)
    if settings.adaptive_tree and tree.num_nodes > 1:
        engine.chooser = TreeChooser(tree, step_costs(settings, engine))
    return Served(engine, tree, settings.deepspeed and not isinstance(model.runner, Int4Llama))


def step_code_digest() -> str:
    """The sha256 of the sources a decode step runs (the engine's, the heads', the int4 path's and its kernel)."""
    sources = [Path(m.__file__) for m in (decode, int4, medusa_model)] + [NATIVE_SOURCE]
    return hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()


def step_costs(settings: Settings, engine: Engine) -> CostTable:
    """COST_TABLE, else the table measured for this model, heads, tree, device and dtype (cached)."""
    if settings.cost_table:
        return CostTable.load(settings.cost_table)
    device = engine.model.device
    key = {"schema": COST_SCHEMA, "model": settings.model_name, "heads": settings.heads(),
           "revision": settings.revision, "tree": [list(p) for p in engine.tree.paths],
           "max_batch_size": engine.max_batch_size, "max_context": engine.max_context,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
           "threads": torch.get_num_threads(), "dtype": str(engine.model.dtype), "deepspeed": settings.deepspeed,
           "weights": engine.model.weights,
           "code": step_code_digest(),  # a step's code: a new one times its steps again
           "tp_size": settings.resolved_tp_size(), "cuda_graphs": engine.cuda_graphs,
           "versions": {name: metadata.version(name) for name in ("torch", "transformers", "deepspeed")}}
    return cost_table(engine, nested_family(engine.tree), key, Path(settings.cost_cache_dir).expanduser())


def cpu_name() -> str:
    """The CPU's model name and core count (platform.processor() is often empty on Linux)."""
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else platform.processor() or platform.machine()} x{os.cpu_count()}"


def choose_tree(settings: Settings, num_heads: int) -> Tree:
    """MEDUSA_CHOICES, else the heads' own tree, else mc_sim_7b_63 (root only without heads)."""
    if settings.medusa_choices:
        return load_tree(settings.medusa_choices)
    if not num_heads:
        return ROOT
    return heads_tree(settings.medusa_heads, settings.revision) or preset("mc_sim_7b_63")
