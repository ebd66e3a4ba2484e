"""tee-client generate through a real gpu-server: the tokens transformers' generate gives, streamed, in every mode."""

import json
import os

import pytest
import torch

from checkpoints import CORPUS
from tee_client.cli import main as tee_client
from test_generation import reference_generate

pytestmark = pytest.mark.process  # every test here starts a gpu-server

PROMPTS = ["The capital of France is Paris.", "Rotary", "A trusted execution environment keeps the prompt"]


def generate_cli(endpoint: str, out_dir, prompts, *extra: str) -> tuple[int, dict | None]:
    """tee-client generate through its CLI: (exit code, the result JSON if it was written)."""
    result = out_dir / "result.json"
    args = ["generate", "--endpoint", endpoint, "--output", str(result), *extra]
    for p in prompts:
        args += ["--prompt", p]
    code = tee_client(args)
    return code, json.loads(result.read_text()) if result.exists() else None


@pytest.mark.parametrize("variant", ["mqa-tied-bias", "dynamic"])
def test_greedy_tokens_equal_transformers_for_each_prompt_alone(variant, checkpoints, start_server, tmp_path):
    folder = checkpoints(variant)
    server = start_server("--model", str(folder))
    code, result = generate_cli(server.endpoint, tmp_path, PROMPTS, "--max-new-tokens", "24", "--ignore-eos")
    assert code == 0
    assert [c["token_ids"] for c in result["completions"]] == reference_generate(folder, PROMPTS, 24, False)
    assert result["transport"] == "shm" and result["decode"]["steps"] == 23
    # a decode step sends one row per sequence (at most 112 float32 wide here), whatever the context: no K or V
    linear = result["decode"]["rpc"]["Linear"]
    assert "Matmul" not in result["decode"]["rpc"] and linear["bytes_sent"] / linear["calls"] <= 3 * 112 * 4 + 1024


def test_smollm2_greedy_batch_equals_transformers_alone(start_server, tmp_path):
    from tsqp.checkpoint import embedded_model_path, resolve_folder

    server = start_server()  # the embedded SmolLM2-135M
    folder, _ = resolve_folder(embedded_model_path())
    prompts = ["The capital of France is", "Write a haiku about the sea. Here it is:"]
    code, result = generate_cli(server.endpoint, tmp_path, prompts, "--max-new-tokens", "24", "--ignore-eos")
    assert code == 0
    assert [c["token_ids"] for c in result["completions"]] == reference_generate(folder, prompts, 24, False)
    assert result["completions"][0]["text"].strip().startswith("Paris")


def test_text_streams_to_stdout_before_the_summary(checkpoints, start_server, tmp_path, capsys):
    folder = checkpoints("gqa")
    server = start_server("--model", str(folder))
    code, result = generate_cli(server.endpoint, tmp_path, PROMPTS[:1], "--max-new-tokens", "12", "--ignore-eos")
    assert code == 0
    out = capsys.readouterr().out
    text = result["completions"][0]["text"]
    assert out.startswith(text + "\n") and "\ngenerate  backend=remote" in out and "time to first token" in out

    code, result = generate_cli(server.endpoint, tmp_path, PROMPTS, "--max-new-tokens", "6", "--json")
    out = capsys.readouterr().out
    stream, _, rest = out.partition("{")
    lines = stream.splitlines()
    assert all(line[:4] in ("[0] ", "[1] ", "[2] ") for line in lines), lines
    for row, c in enumerate(result["completions"]):
        assert "\n".join(line[4:] for line in lines if line.startswith(f"[{row}] ")) == c["text"].rstrip("\n")
    assert json.loads("{" + rest)["completions"] == result["completions"]


@pytest.mark.parametrize("mode", ["otp", "mix"])
def test_privacy_modes_generate_the_same_tokens_and_the_spy_sees_no_token(mode, checkpoints, start_server, tmp_path):
    folder = checkpoints("gqa")
    prompts = [" ".join(CORPUS[:3]), "Rotary"]  # 30 + 2 prompt rows: the prefill is mixed, a 2-row step is not
    server = start_server("--model", str(folder), "--record", str(tmp_path / "spy"))
    extra = ("--privacy", mode, "--model", str(folder), "--max-new-tokens", "24", "--ignore-eos")
    code, result = generate_cli(server.endpoint, tmp_path, prompts, *extra)
    assert code == 0
    got = [c["token_ids"] for c in result["completions"]]
    assert got == reference_generate(folder, prompts, 24, False)
    calls = [torch.load(p) for p in sorted((tmp_path / "spy").glob("*.pt"))]
    calls = [c for c in calls if c["method"] not in ("Init", "Ping")]
    methods = {c["method"] for c in calls}
    assert "Embedding" not in methods and "Matmul" not in methods  # token ids and attention stay in the client
    for c in calls:
        rows = c["tensors"][0].reshape(-1, c["tensors"][0].shape[-1]).shape[0]
        if mode == "otp" or rows < 16:  # a decode step in mix mode goes through one-time pads too
            assert c["method"] in ("LinearRing", "LMHeadRing") and c["tensors"][0].dtype == torch.int64, rows
    if mode == "mix":
        assert {"Linear", "LinearRing"} <= methods
    assert result["decode"]["timing"]["offline_ms"] > 0


def test_plain_mode_control_the_spy_reads_every_generated_token(checkpoints, start_server, tmp_path):
    folder = checkpoints("gqa")
    server = start_server("--model", str(folder), "--record", str(tmp_path / "spy"))
    code, result = generate_cli(server.endpoint, tmp_path, PROMPTS[:1], "--max-new-tokens", "8", "--ignore-eos")
    assert code == 0
    calls = [torch.load(p) for p in sorted((tmp_path / "spy").glob("*.pt"))]
    seen = [int(t) for c in calls if c["method"] == "Embedding" for t in c["tensors"][0].flatten()[-1:]]
    assert seen[1:] == result["completions"][0]["token_ids"][:-1]  # each step's input token, in order


def test_verify_catches_a_wrong_reply_in_a_decode_step(checkpoints, start_server, tmp_path, capsys):
    folder = checkpoints("gqa")
    # two calls per layer (Residual) between a Linear for layer 0's q/k/v and one for the last down_proj: the prefill
    # and each decode step make two Linear calls, the 6th the second decode step's down_proj of layer 1
    liar = start_server("--model", str(folder), "--inject-fault", "Linear:6", env={"TSQP_TESTING": "1"})
    capsys.readouterr()
    extra = ("--verify", "--model", str(folder), "--max-new-tokens", "8")
    code, result = generate_cli(liar.endpoint, tmp_path, PROMPTS[:1], *extra)
    assert code == 1 and result is None
    err = capsys.readouterr().err.strip()
    assert err.startswith("tee-client: error: ") and "Linear layer 1" in err and len(err.splitlines()) == 1, err


def test_honest_generate_with_verify_gives_the_same_tokens(checkpoints, start_server, tmp_path):
    folder = checkpoints("gqa")
    server = start_server("--model", str(folder))
    extra = ("--max-new-tokens", "10", "--ignore-eos")
    code, plain = generate_cli(server.endpoint, tmp_path, PROMPTS, *extra)
    code2, verified = generate_cli(server.endpoint, tmp_path, PROMPTS, *extra, "--verify", "--model", str(folder))
    assert code == code2 == 0
    assert verified["completions"] == plain["completions"]
    assert verified["verify"] and verified["verify_checks"] > 0


def test_bad_requests_are_one_line_errors(checkpoints, start_server, tmp_path, capsys):
    server = start_server("--model", str(checkpoints("gqa")))  # context 64
    for extra, said in [
        (("--max-new-tokens", "60"), "past the model's context of 64"),
        (("--temperature", "-1"), "temperature"),
        (("--top-p", "0"), "top_p"),
    ]:
        code, result = generate_cli(server.endpoint, tmp_path, PROMPTS, *extra)
        err = capsys.readouterr().err.strip()
        assert code == 1 and result is None and said in err and len(err.splitlines()) == 1, err


def test_settings_come_from_the_environment_too(checkpoints, start_server, tmp_path, monkeypatch):
    server = start_server("--model", str(checkpoints("gqa")))
    monkeypatch.setitem(os.environ, "LLAMA_MAX_NEW_TOKENS", "3")
    monkeypatch.setitem(os.environ, "LLAMA_IGNORE_EOS", "1")
    code, result = generate_cli(server.endpoint, tmp_path, PROMPTS[:1])
    assert code == 0 and len(result["completions"][0]["token_ids"]) == 3 and result["sampling"]["ignore_eos"]
