"""Privacy modes: right logits, and a spying server learns nothing (otp) from what it receives.

The spy is a real gpu-server with --record: it keeps every tensor every request sent. The
attacks (benchmarks/attacks.py) run on what it kept; plain mode is the control that shows
each attack works.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.attacks import max_abs_cosine, nearest_embedding_recovery, run_correlation
from benchmarks.privacy import by_width, plaintext_states
from checkpoints import CORPUS, VARIANTS
from conftest import reference_logits, run_prefill_cli
from tsqp.checkpoint import embedded_model_path, load_checkpoint, resolve_folder

pytestmark = pytest.mark.process  # every test here starts a gpu-server

PROMPTS = [" ".join(CORPUS[:4]), "Rotary position embeddings"]
TOLERANCE = {"otp": 5e-3, "mix": 1e-3}
# SmolLM2 at 512 tokens, logits up to ~30: plain is within 1e-3 of transformers; mix's server multiplies A·X, A's
# condition number up to 4 (σ in [1/2, 2]), so its float32 rounding, un-mixed, may grow up to 4x that. Measured over
# six runs each: 3.2e-4 to 1.1e-3 (and 3.1e-4 to 9.6e-4 before 2026-12-07's TEE steps): 1e-3 was a typical value.
SMOLLM2_TOLERANCE = {"otp": 5e-3, "mix": 4e-3}


def max_error(out: dict, reference: np.ndarray) -> float:
    real = out["attention_mask"].astype(bool)
    return float(np.abs(out["logits"][real] - reference[real]).max())


def same_argmax(out: dict, reference: np.ndarray) -> bool:
    real = out["attention_mask"].astype(bool)
    return bool((out["logits"][real].argmax(-1) == reference[real].argmax(-1)).all())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_private_logits_match_transformers(variant, checkpoints, start_server, tmp_path):
    folder = checkpoints(variant)
    server = start_server("--model", str(folder))
    for mode in ("otp", "mix"):
        (tmp_path / mode).mkdir()
        result, out = run_prefill_cli(
            server.endpoint, tmp_path / mode, PROMPTS, 48, 2, "--privacy", mode, "--model", str(folder)
        )
        reference = reference_logits(folder, out["input_ids"], out["attention_mask"])
        assert max_error(out, reference) <= TOLERANCE[mode], f"{variant} {mode}: {max_error(out, reference):.2e}"
        assert same_argmax(out, reference), f"{variant} {mode}"
        assert result["privacy"] == mode
        # token ids and attention never leave the client: no Embedding, no Matmul
        assert set(result["operation_counts"]["gpu"]) == (
            {"LinearRing", "LMHeadRing"} if mode == "otp" else {"Linear", "LMHead"}
        )
        assert result["timing"]["mask_ms"] > 0 and result["timing"]["unmask_ms"] > 0
        assert result["timing_percentage"]["crypto"] > 0


def test_otp_reports_its_offline_phase_and_passthrough_agrees(checkpoints, start_server, tmp_path):
    folder = checkpoints("gqa")
    server = start_server("--model", str(folder))
    (tmp_path / "remote").mkdir(), (tmp_path / "passthrough").mkdir()
    remote, a = run_prefill_cli(
        server.endpoint, tmp_path / "remote", PROMPTS, 24, 2, "--privacy", "otp", "--model", str(folder)
    )
    local, b = run_prefill_cli(
        server.endpoint,
        tmp_path / "passthrough",
        PROMPTS,
        24,
        2,
        "--privacy",
        "otp",
        "--backend",
        "passthrough",
        "--model",
        str(folder),
        "--device",
        "cpu",
    )
    assert remote["timing"]["offline_ms"] > 0 and local["timing"]["offline_ms"] > 0
    assert np.abs(a["logits"] - b["logits"]).max() <= 1e-5  # exact ring products on both paths


def test_a_server_holding_another_model_is_refused(checkpoints, start_server, tmp_path, capsys):
    from tee_client.cli import main

    server = start_server("--model", str(checkpoints("gqa")))
    args = ["prefill", "--endpoint", server.endpoint, "--privacy", "otp", "--model", str(checkpoints("yarn"))]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "fingerprint" in err and "same model" in err and "Traceback" not in err


def test_smollm2_at_512_tokens_in_both_modes(start_server, tmp_path):
    server = start_server()  # the embedded SmolLM2-135M
    folder, _ = resolve_folder(embedded_model_path())
    prompt = " ".join(["The capital of France is Paris, and the capital of Italy is Rome."] * 40)
    for mode in ("otp", "mix"):
        (tmp_path / mode).mkdir()
        result, out = run_prefill_cli(server.endpoint, tmp_path / mode, [prompt], 512, 1, "--privacy", mode)
        assert result["actual_lengths"] == [512]
        reference = reference_logits(folder, out["input_ids"], out["attention_mask"])
        assert max_error(out, reference) <= SMOLLM2_TOLERANCE[mode], f"{mode}: {max_error(out, reference):.2e}"
        assert same_argmax(out, reference), mode


# ---- a spying server --------------------------------------------------------------------------------


def recorded(folder: Path) -> list[dict]:
    return [torch.load(p) for p in sorted(folder.glob("*.pt"))]


def forward_calls(records: list[dict]) -> list[dict]:
    return [r for r in records if r["method"] not in ("Init", "Ping")]


def holds_sequence(t: torch.Tensor, ids: list[int]) -> bool:
    """Does the flattened tensor hold the prompt's ids in order (the way an Embedding request does)?"""
    flat = t.flatten().tolist() if t.numel() < 10**6 else []
    n = len(ids)
    return any(flat[i : i + n] == ids for i in range(len(flat) - n + 1))


@pytest.fixture(scope="module")
def spied(tmp_path_factory):
    """Run the same prompt through a recording server: plain once, otp twice, mix twice."""
    from tsqp.launch import ServerProcess

    root = tmp_path_factory.mktemp("spy")
    prompt = "The patient's diagnosis is confidential and must stay inside the enclave"
    runs = {}
    for name, mode in [("plain", "plain"), ("otp1", "otp"), ("otp2", "otp"), ("mix1", "mix"), ("mix2", "mix")]:
        record = root / name
        with ServerProcess(f"ipc://{root}/{name}.ipc", "--device", "cpu", "--record", str(record)) as server:
            assert "RECORDING" in server.log
            (root / f"out-{name}").mkdir()
            _, out = run_prefill_cli(server.endpoint, root / f"out-{name}", [prompt], 24, 1, "--privacy", mode)
        runs[name] = (forward_calls(recorded(record)), out)
    return runs


@pytest.fixture(scope="module")
def smollm2():
    return load_checkpoint(None, torch.float32, torch.device("cpu"))


def first_layer_table(ckpt) -> torch.Tensor:
    """What a layer-0 q/k/v input looks like for every token: RMSNorm(embedding)·weight. The spy has the model."""
    from tee_client.model import rms_norm

    return rms_norm(
        ckpt.embed.detach().float(), ckpt.layers[0].input_norm.detach().float(), ckpt.config["rms_norm_eps"]
    )


def test_plain_mode_control_the_spy_reads_the_prompt(spied, smollm2):
    calls, out = spied["plain"]
    ids = out["input_ids"][0][out["attention_mask"][0].astype(bool)].tolist()
    assert any(holds_sequence(t, ids) for c in calls for t in c["tensors"])  # the Embedding request
    x = next(c["tensors"][0] for c in calls if c["method"] == "Linear")  # layer 0 q/k/v input
    rows = x.reshape(-1, x.shape[-1])[: len(ids)]  # the real positions
    got = nearest_embedding_recovery(rows, first_layer_table(smollm2), torch.tensor(ids))
    assert got["top1"] >= 0.9, got


@pytest.mark.parametrize("mode", ["otp", "mix"])
def test_the_spy_never_sees_token_ids_attention_or_a_repeat(spied, mode):
    calls, out = spied[f"{mode}1"]
    again, _ = spied[f"{mode}2"]
    ids = out["input_ids"][0][out["attention_mask"][0].astype(bool)].tolist()
    assert {c["method"] for c in calls} == ({"LinearRing", "LMHeadRing"} if mode == "otp" else {"Linear", "LMHead"})
    assert not any(holds_sequence(t, ids) for c in calls for t in c["tensors"])
    assert len(calls) == len(again)
    for first, second in zip(calls, again, strict=True):  # the same prompt, sent twice
        a, b = first["tensors"][0], second["tensors"][0]
        assert not torch.equal(a, b)
        if mode == "otp":  # fresh pads: unrelated (for mix, A·X of one X stays correlated; documented)
            assert run_correlation(a, b) < 0.1


def test_otp_received_rows_are_unrelated_to_any_plaintext_hidden_state(spied, smollm2):
    plain, out = spied["plain"]
    otp, _ = spied["otp1"]
    plaintext = by_width(plaintext_states(plain, smollm2))  # every layer's, though plain sends Residual calls
    assert set(plaintext) == {576, 1536} and plaintext[576].shape[0] > 60 * out["input_ids"].shape[1]
    worst = {"max_abs_cos": 0.0, "max_abs_cos_svd2": 0.0}
    for c in otp:
        u = c["tensors"][0]
        assert u.dtype == torch.int64
        got = max_abs_cosine(u.reshape(-1, u.shape[-1]).double(), plaintext[u.shape[-1]])
        worst = {k: max(worst[k], got[k]) for k in worst}
    assert worst["max_abs_cos"] < 0.3 and worst["max_abs_cos_svd2"] < 0.3, worst

    ids = torch.from_numpy(out["input_ids"][0][out["attention_mask"][0].astype(bool)])
    u = otp[0]["tensors"][0].reshape(-1, otp[0]["tensors"][0].shape[-1])[: len(ids)]
    got = nearest_embedding_recovery(u.double(), first_layer_table(smollm2), ids)
    assert got["top1"] * len(ids) <= 1 and got["top5"] * len(ids) <= 2, got  # chance: ~0 of 24
