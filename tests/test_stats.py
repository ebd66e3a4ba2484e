"""Per-call stats and the time breakdown agree with what crossed; diagnose-transport tells the truth."""

import pytest
import json
import os
import socket
import subprocess

from transformers import AutoConfig

from conftest import BIN, run_prefill_cli
from protocol.endpoints import free_tcp_port
from protocol.wire import PROTOCOL_VERSION
from tsqp.launch import ServerProcess

pytestmark = pytest.mark.process  # every test here starts a gpu-server or another process

HEADER_MAX = 400  # bytes of msgpack header per message, generously


def expected_tensor_bytes(c, bsz: int, seqlen: int) -> dict[str, tuple[int, int]]:
    """(sent, received) tensor bytes per method for one float32 plain forward, from the config alone: two calls per
    layer (tee_client.model.Llama.run_fused), layer 0's q/k/v a Linear before them and the last down_proj one after."""
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    tokens, hidden, inter, layers = bsz * seqlen, c.hidden_size, c.intermediate_size, c.num_hidden_layers
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    residual = (  # Residual(o_proj -> gate, up) per layer, Residual(down_proj -> next q, k, v) but after the last
        tokens * (layers * (q + hidden) + (layers - 1) * (inter + hidden)),  # attention out or SiLU·up, and x
        tokens * (layers * (hidden + 2 * inter) + (layers - 1) * (hidden + q + 2 * kv)),  # h, and the products
    )
    scores = bsz * c.num_attention_heads * seqlen * seqlen
    per_layer_matmul = (
        tokens * (q + kv) + scores + tokens * kv,  # q, k; probs, v
        scores + tokens * q,
    )
    return {
        "Embedding": (tokens * 8, tokens * hidden * 4),
        "Linear": (4 * tokens * (hidden + inter), 4 * tokens * (q + 2 * kv + hidden)),
        "Residual": (4 * residual[0], 4 * residual[1]),
        "Matmul": (4 * layers * per_layer_matmul[0], 4 * layers * per_layer_matmul[1]),
        "LMHead": (tokens * hidden * 4, tokens * c.vocab_size * 4),
    }


@pytest.mark.parametrize("attention", ["tee", "server"])
def test_stats_match_what_crossed(attention, checkpoints, start_server, tmp_path):
    folder = checkpoints("gqa")
    config = AutoConfig.from_pretrained(folder)
    server = start_server("--model", str(folder))
    bsz, seqlen, layers = 2, 40, config.num_hidden_layers
    prompts = ["The capital of France is", "Rotary"]
    result, _ = run_prefill_cli(server.endpoint, tmp_path, prompts, seqlen, bsz, "--attention", attention)
    rpc = result["rpc"]

    calls = {"Embedding": 1, "Linear": 2, "Residual": 2 * layers - 1, "Matmul": 2 * layers, "LMHead": 1}
    if attention == "tee":  # no attention product crosses
        del calls["Matmul"]
    assert {m: rpc[m]["calls"] for m in calls} == calls
    assert rpc["Init"]["calls"] == 1
    for method, (sent, received) in expected_tensor_bytes(config, bsz, seqlen).items():
        if method not in calls:
            assert method not in rpc
            continue
        overhead = HEADER_MAX * calls[method]
        assert sent <= rpc[method]["bytes_sent"] <= sent + overhead, method
        assert received <= rpc[method]["bytes_received"] <= received + overhead, method

    data = result["data_transfer"]
    assert round(data["to_gpu_mb"] * 1e6) == sum(rpc[m]["bytes_sent"] for m in calls)
    assert round(data["to_cpu_mb"] * 1e6) == sum(rpc[m]["bytes_received"] for m in calls)
    assert result["operation_counts"]["gpu"] == calls
    assert result["operation_counts"]["tee"] == {
        "rope_tables": 1,
        "mask": 1,
        "rmsnorm": 3 * layers,  # the first and the final; per layer 1/rms of h, of x, x's folded into the rotation
        "rope": 2 * layers,
        **({"softmax": layers} if attention == "server" else {"attention": layers}),
        "silu": layers,
        "residual": 1,  # the last layer's: the others are the server's, in Residual
    }

    for m in calls:
        r = rpc[m]
        assert 0 < r["rtt_ms"]["p50"] <= r["rtt_ms"]["p99"] <= r["rtt_ms"]["total"] + 1e-9
        assert abs(r["rtt_ms"]["mean"] * r["calls"] - r["rtt_ms"]["total"]) < 1e-6 * r["rtt_ms"]["total"] + 1e-9
        parts = (
            r["serialize_ms"]
            + r["deserialize_ms"]
            + r["server_decode_ms"]
            + r["server_compute_ms"]
            + r["server_encode_ms"]
        )
        assert parts <= r["rtt_ms"]["total"] and r["wire_and_queue_ms"] >= 0

    t = result["timing"]
    assert abs(t["total_ms"] - result["time_seconds"] * 1000) < 1e-6
    assert abs(t["gpu_compute_ms"] - sum(rpc[m]["server_compute_ms"] for m in calls)) < 1e-6
    assert abs(t["transfer_ms"] + t["gpu_compute_ms"] - sum(rpc[m]["rtt_ms"]["total"] for m in calls)) < 1e-3
    measured = t["transfer_ms"] + t["gpu_compute_ms"] + t["tee_compute_ms"]
    assert 0.85 * t["total_ms"] <= measured <= t["total_ms"], t  # separately measured parts cover the total
    assert abs(sum(result["timing_percentage"].values()) - 100) < 1e-6


def diagnose(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BIN / "diagnose-transport", "--max-size-mb", "1", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LLAMA_SHM": "1"},  # shared memory on, whatever the run forces
    )


def test_diagnose_against_a_live_server(checkpoints, start_server):
    server = start_server("--model", str(checkpoints("gqa")), env={"LLAMA_SHM": "1"})
    run = diagnose("--endpoint", server.endpoint, "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["transport"] == "ipc" and report["socket_file"]["state"] == "live"
    assert report["server"]["model"] == "gqa" and report["server"]["protocol"] == PROTOCOL_VERSION
    assert [row["size"] for row in report["protocol"]] == [0, 1024, 4096, 16384, 65536, 262144, 1048576]
    assert all(row["median_ms"] > 0 and row["p99_ms"] >= row["median_ms"] for row in report["protocol"])
    assert report["memcpy"]["reused_gbps"] > 0
    assert any(f.startswith("An empty raw round trip takes") for f in report["findings"])
    assert any("the protocol adds" in f for f in report["findings"])
    assert report["shm"]["on"] is True and report["shm"]["max_reply_bytes"] > 0
    assert [row["size"] for row in report["protocol_shm"]] == [row["size"] for row in report["protocol"]]
    assert all(row["median_ms"] > 0 for row in report["protocol_shm"])
    assert any(f.startswith("shared memory is on: 1 MiB each way takes") for f in report["findings"])

    text = diagnose("--endpoint", server.endpoint)
    assert text.returncode == 0 and "findings" in text.stdout and "raw ipc p50 ms" in text.stdout
    assert "shm        on" in text.stdout and "shm p50 ms" in text.stdout


def test_diagnose_against_nothing(ipc_dir):
    run = diagnose("--endpoint", f"ipc://{ipc_dir}/none.ipc")
    assert run.returncode != 0
    assert "no socket file" in run.stdout and "nothing answers" in run.stdout


def test_diagnose_against_a_stale_socket_file(ipc_dir):
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(ipc_dir / "stale.ipc"))
    run = diagnose("--endpoint", f"ipc://{ipc_dir}/stale.ipc", "--json")
    assert run.returncode != 0
    report = json.loads(run.stdout)
    assert report["socket_file"]["state"] == "stale"
    assert any(f.startswith("stale socket file") for f in report["findings"])


def test_diagnose_over_tcp_compares_with_ipc(checkpoints, ipc_dir):
    with ServerProcess(
        f"tcp://127.0.0.1:{free_tcp_port()}", "--device", "cpu", "--model", str(checkpoints("gqa"))
    ) as server:
        run = diagnose("--endpoint", server.endpoint, "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["transport"] == "tcp-loopback"
    assert any("over ipc" in f and "over tcp loopback" in f for f in report["findings"])
    assert report["shm"]["on"] is False and report["protocol_shm"] == []
    assert any(f.startswith("shared memory is off: tcp") for f in report["findings"])
