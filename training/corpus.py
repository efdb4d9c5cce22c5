"""The bundled model's corpus: the Python sources installed beside the project (the standard library
and the virtual environment's site-packages), split into train and held-out files by a hash of each
file's path, and tokenised once into a flat array of token ids.

A machine with other packages (a GPU machine that trains the model) gets this machine's corpus as an
archive, so that both split it the same way:

    python -m training.corpus artifacts/corpus.tar.xz         # here: pack what collect() reads
    tar xJf corpus.tar.xz -C /tmp/corpus                      # there; then --sources /tmp/corpus
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import site
import sysconfig
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerFast

HELD_OUT_PERCENT = 2  # a file is held out when sha256(its relative path) mod 100 < this
MAX_FILE_BYTES = 200_000  # generated tables and vendored blobs teach nothing


def held_out_by_hash(name: str, percent: float) -> bool:
    """A document is held out when sha256(name) mod 100 < percent: stable across machines and runs."""
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < percent



@dataclass(frozen=True)
class SourceFile:
    root: str  # "stdlib" or "site-packages"
    path: str  # relative to its root, with forward slashes
    text: str

    @property
    def name(self) -> str:
        return f"{self.root}/{self.path}"

    @property
    def held_out(self) -> bool:
        return held_out_by_hash(self.name, HELD_OUT_PERCENT)


def source_roots(folder: Path | None = None) -> dict[str, Path]:
    """This Python's standard library and site-packages, or the same two roots unpacked in `folder`."""
    if folder is not None:
        return {"stdlib": Path(folder) / "stdlib", "site-packages": Path(folder) / "site-packages"}
    roots = {"stdlib": Path(sysconfig.get_paths()["stdlib"])}
    packages = [Path(p) for p in site.getsitepackages() if Path(p).is_dir()]
    if packages:
        roots["site-packages"] = packages[0]
    return roots


def collect(roots: dict[str, Path] | None = None) -> list[SourceFile]:
    """Every readable *.py under the roots, in a stable order (stdlib's site-packages skipped)."""
    files = []
    for label, root in (roots or source_roots()).items():
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if label == "stdlib" and rel.startswith("site-packages/"):
                continue
            if not path.is_file() or path.stat().st_size > MAX_FILE_BYTES:
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                files.append(SourceFile(label, rel, text))
    return files


def split(files: list[SourceFile]) -> tuple[list[SourceFile], list[SourceFile]]:
    train = [f for f in files if not f.held_out]
    return train, [f for f in files if f.held_out]


def encode(tokenizer: PreTrainedTokenizerFast, files: list[SourceFile]) -> np.ndarray:
    """One flat uint16 array: each file as <s> text </s>."""
    eos = tokenizer.eos_token_id
    ids = tokenizer([f.text for f in files])["input_ids"]  # the tokenizer prepends <s>
    return np.fromiter((t for seq in ids for t in [*seq, eos]), dtype=np.uint16)


def model_held_out(model_folder: str | Path) -> list[SourceFile]:
    """The held-out files a bundled model was evaluated on, as its training.json names them (a
    machine with other packages installed has other files; those named and present are used)."""
    names = json.loads((Path(model_folder) / "training.json").read_text())["corpus"]["held_out_files"]
    roots, files = source_roots(), []
    for name in names:
        label, rel = name.split("/", 1)
        path = roots[label] / rel
        if path.is_file():
            files.append(SourceFile(label, rel, path.read_text(encoding="utf-8", errors="replace")))
    return files


def held_out_prompts(tokenizer: PreTrainedTokenizerFast, files: list[SourceFile], count: int, tokens: int
                     ) -> list[list[int]]:
    """`count` prompts of `tokens` tokens (BOS included), one from each of `count` held-out files
    spread over the list; each starts at a line in the middle of its file."""
    files = [f for f in files if len(f.text) > 8 * tokens]
    prompts = []
    for f in files[:: max(1, len(files) // count)][:count]:
        start = f.text.rfind("\n", 0, len(f.text) // 2) + 1
        prompts.append(tokenizer(f.text[start:])["input_ids"][:tokens])
    return prompts


def held_out_arguments(description: str, prompts: int) -> argparse.ArgumentParser:
    """The command line that the scripts decoding held-out prompts share: a model and its heads, the
    prompts, and the dtype to decode in."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True)
    parser.add_argument("--heads", required=True)
    parser.add_argument("--prompts", type=int, default=prompts)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="auto", help="to decode in; auto: as the service chooses")
    parser.add_argument("--quantize", default="auto", choices=("auto", "gguf", "int4", "none"),
                        help="the base weights, as the QUANTIZE setting; auto: as the service chooses")
    return parser


def pack(files: list[SourceFile], archive: Path) -> None:
    """The files as <root>/<path> in an xz-compressed tar (code compresses about tenfold)."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:xz") as tar:
        for f in files:
            data = f.text.encode("utf-8")
            info = tarfile.TarInfo(f.name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Pack the corpus that collect() reads on this machine.")
    parser.add_argument("archive", type=Path)
    pack(collect(), parser.parse_args().archive)
