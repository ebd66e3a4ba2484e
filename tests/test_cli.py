"""What a user types wrong gets one line and exit 1 (argparse: 2), never a traceback; in-process."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from protocol.security import main as keygen
from tee_client.cli import diagnose_transport
from tee_client.cli import main as tee_client


def one_line_error(capsys, prog: str, *words: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"{prog}: error:") or "error:" in err, err
    for w in words:
        assert w in err, err
    return err


@pytest.mark.parametrize("timeout", ["inf", "1e300", "0", "-1", "0.0001"])
def test_tee_client_refuses_a_timeout_that_cannot_be_waited_for(timeout, capsys, ipc_dir):
    assert tee_client(["prefill", "--endpoint", f"ipc://{ipc_dir}/x.ipc", "--timeout", timeout]) == 1
    one_line_error(capsys, "tee-client", "timeout")


def test_an_empty_prompt_file_is_an_error(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("\n  \n")
    assert tee_client(["prefill", "--prompt-file", str(tmp_path / "p.txt")]) == 1
    one_line_error(capsys, "tee-client", "holds no prompt")


@pytest.mark.parametrize(
    "flag, path, words",
    [("--save-logits", "/nonexistent/dir/l.npz", "does not exist"), ("--output", "/tmp", "is a folder")],
)
def test_an_output_that_cannot_be_written_fails_before_the_prefill(flag, path, words, capsys, ipc_dir):
    assert tee_client(["prefill", "--endpoint", f"ipc://{ipc_dir}/none.ipc", flag, path]) == 1
    one_line_error(capsys, "tee-client", words)  # not "nothing listening": checked before connecting


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), ["no tensor model.layers.1.mlp.up_proj.weight"]),
        (lambda t: t.update({"model.norm.weight": torch.ones(63)}), ["model.norm.weight is [63]", "says [64]"]),
    ],
    ids=["missing", "misshapen"],
)
def test_a_checkpoint_missing_a_tensor_or_holding_a_misshapen_one_is_one_line(
    edit, words, checkpoints, tmp_path, capsys
):
    folder = tmp_path / "broken"
    shutil.copytree(checkpoints("gqa"), folder)
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")
    capsys.readouterr()  # building the checkpoint prints a progress bar
    assert tee_client(["prefill", "--backend", "tee-only", "--model", str(folder)]) == 1
    one_line_error(capsys, "tee-client", "cannot load", *words)


def test_a_corrupt_checkpoint_is_one_line(checkpoints, tmp_path, capsys):
    folder = tmp_path / "corrupt"
    shutil.copytree(checkpoints("gqa"), folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    capsys.readouterr()  # building the checkpoint prints a progress bar
    assert tee_client(["prefill", "--backend", "tee-only", "--model", str(folder)]) == 1
    one_line_error(capsys, "tee-client", "cannot load")


@pytest.mark.parametrize(
    "args", [["--max-size-mb", "-5"], ["--timeout", "-1"], ["--timeout", "0"], ["--timeout", "inf"]]
)
def test_diagnose_refuses_sizes_and_timeouts_it_cannot_use(args, capsys):
    with pytest.raises(SystemExit) as exit:
        diagnose_transport(args)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: argument" in err


@pytest.mark.parametrize("name, words", [("a/b", "plain file name"), ("", "plain file name")])
def test_keygen_refuses_names_that_are_not_file_names(name, words, tmp_path, capsys):
    assert keygen([name, "--dir", str(tmp_path)]) == 1
    one_line_error(capsys, "tsqp-keygen", words)


def test_keygen_into_an_impossible_folder_is_one_line(capsys):
    assert keygen(["srv", "--dir", "/proc/nope"]) == 1
    one_line_error(capsys, "tsqp-keygen", "/proc/nope")
