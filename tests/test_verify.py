"""--verify catches a lying GPU host: a real gpu-server with a fault switched on, for tests only."""

import subprocess

import numpy as np
import pytest

from conftest import BIN, run_prefill_cli
from tee_client.cli import main as tee_client

pytestmark = pytest.mark.process  # every test here starts a gpu-server

PROMPTS = ["The capital of France is Paris.", "Grouped query attention shares keys and values"]
TESTING = {"TSQP_TESTING": "1"}


def lying_server(start_server, folder, fault: str, name: str, *extra: str):
    return start_server("--model", str(folder), "--inject-fault", fault, *extra, env=TESTING, name=name)


def prefill(endpoint: str, folder, out, *extra: str) -> int:
    args = ["prefill", "--endpoint", endpoint, "--model", str(folder), "--length", "24", "--warmup", "0"]
    args += ["--output", str(out / "r.json"), "--save-logits", str(out / "l.npz"), *extra]
    for p in PROMPTS:
        args += ["--prompt", p]
    return tee_client(args)


def mode_flags(mode: str) -> list[str]:
    """--privacy MODE, or "server-attention": plain, a prefill's Q·Kᵀ and P·V on the server (Matmul calls)."""
    return ["--privacy", "plain", "--attention", "server"] if mode == "server-attention" else ["--privacy", mode]


@pytest.mark.parametrize(
    "mode, fault, named",
    [
        ("plain", "Linear:5", "Linear layer 1 q_proj"),  # an RMSNorm's rows: bounded without a pass
        ("plain", "Linear:4", "Linear layer 0 down_proj"),  # rows of any norm
        ("plain", "Residual:2", "Residual layer 0 down_proj: the residual stream h"),  # two calls per layer
        ("server-attention", "Matmul:3", "Matmul"),
        ("plain", "LMHead:1", "LMHead"),
        ("plain", "Embedding:1", "Embedding"),
        ("otp", "LinearRing:6", "LinearRing layer 1 o_proj"),
        ("otp", "LMHeadRing:1", "LMHeadRing"),
        ("mix", "Linear:2", "Linear layer 0 o_proj"),
    ],
)
def test_a_wrong_reply_is_caught_every_time_with_verify_and_changes_logits_without(
    mode, fault, named, checkpoints, start_server, tmp_path, capsys
):
    # biases on every projection keep a forward at four calls per layer; without them plain takes two (Residual)
    folder = checkpoints("gqa" if fault.startswith("Residual") else "mqa-tied-bias")
    honest = start_server("--model", str(folder), name="honest.ipc")
    (tmp_path / "honest").mkdir(), (tmp_path / "fooled").mkdir(), (tmp_path / "caught").mkdir()
    flags = mode_flags(mode)
    assert prefill(honest.endpoint, folder, tmp_path / "honest", *flags) == 0
    liar = lying_server(start_server, folder, fault, "liar.ipc")
    assert prefill(liar.endpoint, folder, tmp_path / "fooled", *flags) == 0
    good, bad = np.load(tmp_path / "honest" / "l.npz"), np.load(tmp_path / "fooled" / "l.npz")
    assert np.abs(good["logits"] - bad["logits"]).max() > 1e-3, "the fault did not change the logits"

    # its fault counter starts again; it keeps every request it gets, as a spy would
    liar = lying_server(start_server, folder, fault, "fresh-liar.ipc", "--record", str(tmp_path / "seen"))
    capsys.readouterr()
    assert prefill(liar.endpoint, folder, tmp_path / "caught", *flags, "--verify") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("tee-client: error: ") and named in err and "Traceback" not in err, err
    assert len(err.splitlines()) == 1 and ("fails" in err or "differ" in err), err
    assert not (tmp_path / "caught" / "r.json").exists() and not (tmp_path / "caught" / "l.npz").exists()
    # the client stopped at once: the last request the liar saw is the one it answered wrongly
    method, n = fault.split(":")
    seen = [path.stem.split("-", 1)[1] for path in sorted((tmp_path / "seen").iterdir())]
    assert seen[-1] == method and seen.count(method) == int(n), seen


@pytest.mark.parametrize("mode", ["plain", "server-attention", "otp", "mix"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_honest_servers_pass_and_verify_changes_no_logit(mode, dtype, checkpoints, start_server, tmp_path):
    folder = checkpoints("gqa")
    server = start_server("--model", str(folder), "--dtype", dtype)
    runs = {}
    for verify in (False, True):
        out = tmp_path / str(verify)
        out.mkdir()
        extra = mode_flags(mode) + ["--model", str(folder), "--dtype", dtype] + (["--verify"] if verify else [])
        result, logits = run_prefill_cli(server.endpoint, out, PROMPTS, 32, 2, *extra)
        runs[verify] = result, logits
    result = runs[True][0]
    assert result["verify"] is True and result["verify_checks"] > 0 and result["timing"]["verify_ms"] > 0
    assert runs[False][0]["verify"] is False and runs[False][0]["verify_checks"] == 0
    if mode != "mix":  # mix draws fresh matrices each run: its float rounding differs run to run
        assert np.array_equal(runs[True][1]["logits"], runs[False][1]["logits"])


def test_smollm2_at_512_tokens_passes_verify_on_float32_and_bfloat16(start_server, tmp_path):
    prompt = " ".join(["The capital of France is Paris, and the capital of Italy is Rome."] * 40)
    for dtype, calls in (("float32", 2), ("bfloat16", 4)):  # calls per layer (tee_client.model)
        server = start_server("--dtype", dtype, name=f"{dtype}.ipc")
        (tmp_path / dtype).mkdir()
        result, _ = run_prefill_cli(server.endpoint, tmp_path / dtype, [prompt], 512, 1, "--verify", "--dtype", dtype)
        assert result["verify_checks"] >= 30 * calls * 512  # at least one check per row of each layer's calls


def test_fault_injection_is_refused_outside_tests(checkpoints, ipc_dir):
    run = subprocess.run(
        [BIN / "gpu-server", "--endpoint", f"ipc://{ipc_dir}/f.ipc", "--inject-fault", "Linear:1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1 and "TSQP_TESTING=1" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize(
    "command, mode, fault",
    [
        ("prefill", "plain", "Linear:2:shape"),  # layer 0's q/k/v, then the last down_proj: the rest are Residual
        ("prefill", "server-attention", "Matmul:2:shape"),
        ("prefill", "otp", "LinearRing:4:shape"),
        ("generate", "plain", "Residual:5:shape"),
    ],
)
def test_a_reply_of_the_wrong_shape_stops_any_client_in_one_line(
    command, mode, fault, checkpoints, start_server, tmp_path, capsys
):
    """No --verify needed: every client holds each reply to what its request asks for (tee_client.ops.check_reply)."""
    folder = checkpoints("gqa")
    liar = lying_server(start_server, folder, fault, "short.ipc")
    args = [command, "--endpoint", liar.endpoint, "--model", str(folder), *mode_flags(mode)]
    args += ["--prompt", PROMPTS[0], "--output", str(tmp_path / "r.json")]
    args += ["--length", "24", "--warmup", "0"] if command == "prefill" else ["--max-new-tokens", "4"]
    capsys.readouterr()
    assert tee_client(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("tee-client: error: ") and "Traceback" not in err and len(err.splitlines()) == 1, err
    method = fault.split(":")[0]
    assert f"{method}: the server replied" in err and "where the request asks for" in err, err
    assert not (tmp_path / "r.json").exists()
