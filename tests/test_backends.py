"""One model, three placements: remote, passthrough and tee-only give the same logits and fields."""

import numpy as np
import pytest

from conftest import reference_logits, run_prefill_cli

PROMPTS = ["The capital of France is Paris.", "Grouped query attention shares keys"]


@pytest.mark.process
@pytest.mark.parametrize("variant", ["gqa", "mqa-tied-bias"])
def test_three_backends_agree(variant, checkpoints, start_server, tmp_path):
    folder = checkpoints(variant)
    server = start_server("--model", str(folder))
    results, logits = {}, {}
    for backend in ("remote", "passthrough", "tee-only"):
        out_dir = tmp_path / backend
        out_dir.mkdir()
        extra = ["--backend", backend] + ([] if backend == "remote" else ["--model", str(folder), "--device", "cpu"])
        results[backend], out = run_prefill_cli(server.endpoint, out_dir, PROMPTS, 20, 2, *extra)
        logits[backend] = out["logits"]

    for backend in ("passthrough", "tee-only"):
        assert np.abs(logits[backend] - logits["remote"]).max() <= 1e-5, backend
        assert results[backend].keys() == results["remote"].keys()
        assert results[backend]["timing"].keys() == results["remote"]["timing"].keys()
        assert results[backend]["operation_counts"] == results["remote"]["operation_counts"]
        assert results[backend]["predictions"] == results["remote"]["predictions"]
        assert results[backend]["endpoint"] is None and results[backend]["backend"] == backend
    assert results["tee-only"]["timing"]["transfer_ms"] == 0
    assert results["tee-only"]["data_transfer"]["total_mb"] == 0
    assert results["remote"]["timing"]["transfer_ms"] > 0

    ids, mask = out["input_ids"], out["attention_mask"]
    real = mask.astype(bool)
    assert np.abs(logits["tee-only"][real] - reference_logits(folder, ids, mask)[real]).max() <= 1e-4


def test_in_process_backend_reports_a_bad_model_path_in_one_line(tmp_path, capsys):
    from tee_client.cli import main

    assert main(["prefill", "--backend", "tee-only", "--model", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tee-client: error:") and "does not exist" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["prefill", "generate"])
def test_logits_that_overflow_float16_are_one_line_not_a_token_read_off_nan(checkpoints, tmp_path, capsys, command):
    """A weight of 65000 loads in float16 (it fits) but its products overflow: the logits come out NaN or inf. That
    is one line and exit 1, not '<unk>' (id 0) as if it were a prediction, and no result file."""
    import shutil

    from safetensors.torch import load_file, save_file

    from tee_client.cli import main

    folder = shutil.copytree(checkpoints("gqa"), tmp_path / "model")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"][0, 0] = 65000.0
    save_file({name: t.clone() for name, t in tensors.items()}, folder / "model.safetensors")
    out = tmp_path / "r.json"
    args = ["--backend", "tee-only", "--model", str(folder), "--dtype", "float16", "--output", str(out)]
    args += ["--length", "8"] if command == "prefill" else ["--max-new-tokens", "2"]
    capsys.readouterr()  # what building the checkpoint printed
    assert main([command, *args]) == 1
    err = capsys.readouterr().err
    assert (
        err.strip() == "tee-client: error: the model's logits hold NaN or inf (with --dtype float16, "
        "activations past 65504 overflow: bfloat16 or float32 keep the range)"
    )
    assert not out.exists()
