"""The wire format: raw frames, bit-exact dtypes, settings from the environment."""

import json
import subprocess

import pytest
import torch

from conftest import BIN
from protocol.messages import Request
from protocol.wire import PROTOCOL_VERSION, TORCH_DTYPES, decode_header, pack, unpack_tensors
from tee_client.rpc import RpcClient


def awkward(dtype: torch.dtype) -> torch.Tensor:
    """Random values plus the bit patterns a careless codec loses: NaN, ±inf, -0, subnormals."""
    if not dtype.is_floating_point:
        return torch.randint(-(2**31), 2**31 - 1, (3, 5), dtype=dtype)
    t = torch.randn(3, 5).to(dtype)
    t.view(-1)[:5] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, torch.finfo(dtype).tiny / 4]).to(
        dtype
    )
    return t


@pytest.mark.parametrize("dtype", list(TORCH_DTYPES.values()), ids=list(TORCH_DTYPES))
def test_pack_unpack_is_bit_exact_and_elementwise_free(dtype):
    t = awkward(dtype)
    frames = pack({"v": PROTOCOL_VERSION, "id": 1, "method": "Echo"}, [t, t[:, 1:]])
    header = decode_header(frames[0], Request)
    assert len(frames[0]) < 200  # the header never carries elements
    assert header.tensors[1].shape == [3, 4]
    back = unpack_tensors(header.tensors, [bytearray(f) for f in frames[1:]])
    assert back[0].dtype == dtype and torch.equal(back[0].view(torch.uint8), t.view(torch.uint8))
    assert torch.equal(back[1].view(torch.uint8), t[:, 1:].contiguous().view(torch.uint8))


@pytest.mark.process
def test_every_dtype_crosses_a_real_server_bit_exactly(checkpoints, start_server):
    server = start_server("--model", str(checkpoints("gqa")))
    with RpcClient(server.endpoint, timeout_s=10) as rpc:
        sent = [awkward(d) for d in TORCH_DTYPES.values()] + [torch.empty(0, 4), torch.randn(1 << 18)]  # + 1 MiB
        _, back = rpc.call("Echo", {}, sent)
    for a, b in zip(sent, back, strict=True):
        assert torch.equal(a.view(torch.uint8), b.to(a.dtype).view(torch.uint8))


@pytest.mark.process
def test_settings_come_from_the_environment(checkpoints, ipc_dir, tmp_path):
    """gpu-server and tee-client configured by LLAMA_* variables alone, no flags."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\n\nRotary position\n")
    env = {
        "LLAMA_MODEL_PATH": str(checkpoints("gqa")),
        "LLAMA_GPU_ENDPOINT": f"ipc://{ipc_dir}/env.ipc",
        "LLAMA_GPU_DEVICE": "cpu",
        "LLAMA_DTYPE": "bfloat16",
        "LLAMA_PREFILL_LENGTH": "12",
        "LLAMA_TEE_BATCH_SIZE": "3",
        "LLAMA_PROMPT_PATH": str(prompts),
        "LLAMA_TEE_RESULT_PATH": str(tmp_path / "r.json"),
        "LLAMA_WARMUP": "0",
    }
    from tsqp.launch import ServerProcess

    with ServerProcess(env["LLAMA_GPU_ENDPOINT"], env=env) as server:
        assert "dtype bfloat16" in server.log
        run = subprocess.run(
            [BIN / "tee-client", "prefill"], env={**server.env}, capture_output=True, text=True, timeout=120
        )
    assert run.returncode == 0, run.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert (result["prefill_length"], result["batch_size"], result["dtype"]) == (12, 3, "bfloat16")
    assert [p["prompt"] for p in result["predictions"]] == [
        "The capital of France is",
        "Rotary position",
        "The capital of France is",
    ]
    assert result["total_tokens"] == 36 and result["throughput_tokens_per_sec"] > 0
    assert "->" in run.stdout  # the human-readable summary
