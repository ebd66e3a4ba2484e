"""A damaged or hostile model folder: one CheckpointError naming the problem; never a traceback, a hang or a silently
wrong model. In-process, on copies of the tiny checkpoints in tests/checkpoints.py."""

import json
import os
import shutil
import signal
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file, save_file

from protocol.errors import CheckpointError
from tsqp.checkpoint import load_checkpoint

CPU = torch.device("cpu")


def load(folder):
    return load_checkpoint(folder, torch.float32, CPU)


def refused(folder, *words: str) -> str:
    with pytest.raises(CheckpointError) as e:
        load(folder)
    message = str(e.value)
    assert "\n" not in message, message
    for w in words:
        assert w in message, message
    return message


@contextmanager
def no_hang(seconds: int = 10):
    """A load that blocks (opening a FIFO) fails the test instead of hanging the suite."""

    def hang(*_):
        raise AssertionError(f"still loading after {seconds} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def folder(checkpoints, tmp_path):
    """A private copy of the gqa checkpoint, to damage."""
    return shutil.copytree(checkpoints("gqa"), tmp_path / "model")


def edit_tensors(folder, edit, file="model.safetensors"):
    tensors = load_file(folder / file)
    edit(tensors)
    save_file({name: t.clone() for name, t in tensors.items()}, folder / file)


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def shard(folder) -> list[str]:
    """Split model.safetensors in two shards with an index, as save_pretrained does; returns the shard names."""
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names, files = sorted(tensors), ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    for file, half in zip(files, halves, strict=True):
        save_file({n: tensors[n] for n in half}, folder / file)
    weight_map = {n: file for file, half in zip(files, halves, strict=True) for n in half}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files


def test_a_sharded_checkpoint_loads_and_one_missing_a_shard_names_it(folder):
    files = shard(folder)
    assert len(load(folder).layers) == 2
    (folder / files[1]).unlink()
    refused(folder, f"model.safetensors.index.json names {files[1]}, which is not there")


def test_a_tensor_in_two_shards_is_refused_not_silently_taken_from_one(folder):
    files = shard(folder)
    held = "model.norm.weight"
    other = next(f for f in files if held not in load_file(folder / f))
    edit_tensors(folder, lambda t: t.update({held: torch.zeros(64)}), other)
    refused(folder, f"{held} is in both", *files)


def test_a_stale_single_file_beside_the_shards_is_refused(folder):
    stale = load_file(folder / "model.safetensors")
    shard(folder)
    save_file(stale, folder / "model.safetensors")
    refused(folder, "is in both", "model.safetensors")


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.bool])
def test_integer_weights_are_refused_not_cast_to_float(folder, dtype):
    name = "model.layers.0.mlp.up_proj.weight"
    edit_tensors(folder, lambda t: t.update({name: (t[name] * 100).to(dtype)}))
    refused(folder, name, str(dtype), "not floating point")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_float_dtypes_load_as_the_dtype_asked_for(folder, dtype):
    edit_tensors(folder, lambda t: t.update({n: w.to(dtype) for n, w in t.items()}))
    assert load(folder).layers[1].linears["down_proj"].weight.dtype == torch.float32


def copy_layer_1_as_layer_2(tensors):
    for name in [n for n in tensors if n.startswith("model.layers.1.")]:
        tensors[name.replace("layers.1.", "layers.2.")] = tensors[name]


@pytest.mark.parametrize(
    "edit, named",
    [
        (copy_layer_1_as_layer_2, "model.layers.2.input_layernorm.weight (and 8 more)"),  # config says 2 layers
        (lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.ones(64)}), "q_proj.bias"),  # no bias
        (lambda t: t.update({"norm.weight": torch.zeros(64)}), "norm.weight"),  # beside model.norm.weight
        (lambda t: t.update({"model.layers.0.self_attn.q_proj.weight_scale": torch.ones(1)}), "weight_scale"),
    ],
    ids=["extra-layer", "bias-not-enabled", "bare-duplicate", "quantization-scale"],
)
def test_a_tensor_the_config_has_no_place_for_is_refused_not_dropped(folder, edit, named):
    edit_tensors(folder, edit)
    refused(folder, "its config has no place for tensor", named)


def test_fewer_layers_in_the_config_than_in_the_weights_is_refused(folder):
    edit_config(folder, num_hidden_layers=1)
    refused(folder, "no place for tensor model.layers.1.")


def test_rotary_buffers_older_checkpoints_hold_are_ignored(folder):
    edit_tensors(folder, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    assert len(load(folder).layers) == 2


def test_tied_embeddings_with_a_different_lm_head_in_the_file_are_refused(folder):
    """transformers keeps the file's lm_head then (and says so), the loader would take the embedding: ambiguous."""
    edit_config(folder, tie_word_embeddings=True)
    refused(folder, "ties lm_head.weight to the embedding, but they differ")
    edit_tensors(folder, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"]}))
    ckpt = load(folder)
    assert ckpt.lm_head.weight is ckpt.embed  # the same tensor saved twice is fine


@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(num_hidden_layers=-1), "num_hidden_layers -1, not a positive integer"),
        (dict(num_hidden_layers=0), "num_hidden_layers 0"),
        (dict(num_hidden_layers=1.5), "num_hidden_layers 1.5"),
        (dict(num_hidden_layers=True), "num_hidden_layers True"),
        (dict(hidden_size="64"), "hidden_size '64'"),
        (dict(hidden_size=None), "lacks hidden_size"),
        (dict(num_key_value_heads=0), "num_key_value_heads 0"),
        (dict(head_dim=-16), "head_dim -16"),
        (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    ],
)
def test_a_config_with_nonsense_sizes_or_another_activation_is_refused(folder, changes, words):
    edit_config(folder, **changes)
    refused(folder, words)


def test_key_value_heads_that_do_not_divide_the_heads_are_refused_even_with_matching_weights(folder):
    edit_config(folder, num_key_value_heads=3)  # 4 heads of 16
    kv = {f"model.layers.{i}.self_attn.{n}_proj.weight": torch.ones(48, 64) for i in range(2) for n in "kv"}
    edit_tensors(folder, lambda t: t.update(kv))
    refused(folder, "4 attention heads: not a multiple of 3 key-value heads")


def test_a_config_nested_too_deep_for_json_is_one_error(folder):
    (folder / "config.json").write_text("[" * 100_000)
    refused(folder, "cannot read the config", "recursion")


@pytest.mark.parametrize("kind", ["fifo", "folder", "symlink-loop"])
def test_a_weight_file_that_is_not_a_regular_file_is_skipped_without_hanging(folder, kind):
    odd = folder / "zz-extra.safetensors"
    {"fifo": os.mkfifo, "folder": os.mkdir, "symlink-loop": lambda p: os.symlink(p, p)}[kind](odd)
    with no_hang():
        assert len(load(folder).layers) == 2


def test_a_folder_whose_only_weights_are_a_fifo_is_one_error_not_a_hang(folder):
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")
    with no_hang():
        refused(folder, "no weight files")


def test_an_unreadable_weight_file_is_one_error(folder, monkeypatch):
    """As root chmod does not bite, so reading is made to fail as it would for another user."""
    import tsqp.checkpoint

    def denied(file, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(tsqp.checkpoint, "open", denied, raising=False)
    refused(folder, "cannot read", "Permission denied")


def bin_checkpoint(folder, obj) -> None:
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(obj(tensors), folder / "pytorch_model.bin")


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch RAN",))


def test_a_bin_file_that_would_run_code_is_refused_unrun_and_named(folder, monkeypatch):
    monkeypatch.chdir(folder)
    bin_checkpoint(folder, lambda t: t)
    assert len(load(folder).layers) == 2
    torch.save({"lr": RunsCode()}, folder / "extra.bin")
    refused(folder, "extra.bin", "could run code")
    assert not (folder / "RAN").exists()


def test_a_trainers_training_args_bin_beside_the_weights_is_left_alone_unread(folder, monkeypatch):
    monkeypatch.chdir(folder)
    bin_checkpoint(folder, lambda t: t)
    without = load(folder).fingerprint
    torch.save({"lr": RunsCode()}, folder / "training_args.bin")  # what a Trainer's output folder holds, pickled
    ckpt = load(folder)
    assert len(ckpt.layers) == 2 and ckpt.fingerprint == without  # not part of the model: the same model
    assert not (folder / "RAN").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_weight_holding_nan_or_inf_is_refused_and_named(folder, value):
    name = "model.layers.1.self_attn.o_proj.weight"
    edit_tensors(folder, lambda t: t[name].view(-1).__setitem__(7, value))
    refused(folder, name, "NaN or inf")


def test_a_weight_too_large_for_the_dtype_asked_for_is_refused_and_named(folder):
    name = "model.layers.0.mlp.down_proj.weight"
    edit_tensors(folder, lambda t: t[name].view(-1).__setitem__(3, 1e6))  # float16's largest is 65504
    with pytest.raises(CheckpointError, match=f"{name} has values too large for float16"):
        load_checkpoint(folder, torch.float16, CPU)
    assert load(folder).layers[0].linears["down_proj"].weight.abs().max() == 1e6  # float32 holds it


@pytest.mark.parametrize(
    "obj",
    [lambda t: t["model.norm.weight"], lambda t: {**t, "model.norm.weight": 1}, lambda t: {"state_dict": t}],
    ids=["bare-tensor", "int-value", "nested"],
)
def test_a_bin_file_that_is_not_a_state_dict_is_one_error(folder, obj):
    bin_checkpoint(folder, obj)
    refused(folder, "pytorch_model.bin", "not a state dict")


def test_a_gguf_file_transformers_cannot_read_is_one_error_and_leaves_no_staging(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(64))
    refused(tmp_path / "junk.gguf", "cannot convert", "junk.gguf")
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize("target", ["loop", "nowhere"])
def test_a_model_path_that_is_a_dangling_or_looping_symbolic_link_says_so(tmp_path, target):
    link = tmp_path / "loop"
    link.symlink_to(tmp_path / target)
    with pytest.raises(CheckpointError, match=r"does not exist \(a symbolic link to nothing, or a loop of them\)"):
        load(link)
