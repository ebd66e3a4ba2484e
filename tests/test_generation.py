"""Generation in-process (no server): the KV cache, the sampler and the streamer, against transformers.

tee-only runs the whole split in this process, so these are the fast tier's checks of
tee_client.generate and the cache in tee_client.model; tests/test_generate.py runs the same
through a real gpu-server.
"""

import io

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from checkpoints import VARIANTS
from tee_client.generate import Sampler, Streamer, run_generate
from tee_client.settings import GenerateSettings

PROMPTS = ["The capital of France is Paris.", "Rotary", "A trusted execution environment keeps the prompt"]


def reference_generate(folder, prompts: list[str], new_tokens: int, stop_at_eos: bool) -> list[list[int]]:
    """transformers' greedy generate, each prompt alone: the new token ids (the eos included when it stops there)."""
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        eos = {} if stop_at_eos else {"eos_token_id": None}
        full = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens, **eos
        )
        out.append(full[0, ids.shape[1] :].tolist())
    return out


def generate(folder, prompts=PROMPTS, **settings) -> dict:
    defaults = dict(backend="tee-only", model_path=str(folder), prompt=prompts, max_new_tokens=24)
    return run_generate(GenerateSettings(**{**defaults, **settings}))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_batch_of_different_lengths_matches_each_prompt_alone(variant, checkpoints):
    folder = checkpoints(variant)
    result = generate(folder, ignore_eos=True)
    want = reference_generate(folder, PROMPTS, 24, stop_at_eos=False)
    assert [c["token_ids"] for c in result["completions"]] == want
    assert all(c["finish_reason"] == "length" for c in result["completions"])
    assert result["prompt_lengths"] == [8, 2, 8]


def test_rows_stop_at_the_end_of_sequence_token_as_transformers_does(checkpoints):
    folder = checkpoints("dynamic")  # its third prompt ends after 9 tokens, the others run to 24
    result = generate(folder)
    want = reference_generate(folder, PROMPTS, 24, stop_at_eos=True)
    got = [c["token_ids"] for c in result["completions"]]
    assert got == want
    reasons = [c["finish_reason"] for c in result["completions"]]
    assert reasons == ["stop" if len(ids) < 24 else "length" for ids in want] and "stop" in reasons
    # the finished row left the batch: later steps carried fewer rows
    assert result["decode"]["steps"] == 23 and result["new_tokens"] == sum(map(len, want))


def test_sampling_is_reproducible_with_a_seed_and_changes_without(checkpoints):
    folder = checkpoints("gqa")
    sample = dict(temperature=1.0, top_k=40, top_p=0.95, ignore_eos=True)
    runs = [generate(folder, seed=seed, **sample) for seed in (7, 7, 8)]
    ids = [[c["token_ids"] for c in r["completions"]] for r in runs]
    assert ids[0] == ids[1] and ids[0] != ids[2]
    assert runs[0]["sampling"]["seed"] == 7
    assert generate(folder, **sample)["sampling"]["seed"] >= 0  # drawn, and reported for a rerun


def test_the_result_json_has_every_field(checkpoints):
    result = generate(checkpoints("gqa"), max_new_tokens=5, ignore_eos=True)
    assert result["mode"] == "generate" and result["new_tokens"] == 15
    assert set(result["decode_ms_per_token"]) == {"mean", "p50", "p99"}
    assert result["ttft_ms"] > 0 and result["tokens_per_sec"] > 0
    for phase, steps in (("prefill", 1), ("decode", 4)):
        assert result[phase]["steps"] == steps
        assert {"rpc", "timing", "timing_percentage", "data_transfer", "operation_counts"} <= set(result[phase])
    # a decode step: Embedding, layer 0's q/k/v, then per layer two Residual calls (the second of the last
    # layer gives the logits); attention stays in the client, one fused kernel per layer and step
    assert result["decode"]["operation_counts"]["gpu"] == {"Embedding": 4, "Linear": 4, "Residual": 4 * 2 * 2}
    assert result["decode"]["operation_counts"]["tee"]["attention"] == 4 * 2
    assert "softmax" not in result["decode"]["operation_counts"]["tee"]
    # with biases on q/k/v and gate/up (which follow the 1/rms scale) the step takes the four calls per layer
    biased = generate(checkpoints("mqa-tied-bias"), max_new_tokens=5, ignore_eos=True)
    assert biased["decode"]["operation_counts"]["gpu"] == {"Embedding": 4, "Linear": 32, "LMHead": 4}
    c = result["completions"][1]
    assert set(c) == {"prompt", "token_ids", "text", "finish_reason"} and c["prompt"] == PROMPTS[1]


def test_greedy_is_argmax_and_top_k_one_is_greedy():
    logits = torch.randn(4, 50)
    assert torch.equal(Sampler(0.0, 0, 1.0, seed=1)(logits), logits.argmax(-1))
    assert torch.equal(Sampler(0.7, 1, 1.0, seed=1)(logits), logits.argmax(-1))


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.8), (10, 0.5), (0, 0.01)])
def test_the_sampler_draws_only_from_the_tokens_transformers_keeps(top_k, top_p):
    logits = torch.randn(3, 64) * 3
    kept = logits.clone()
    if top_k:
        kept = TopKLogitsWarper(top_k)(None, kept)
    if top_p < 1:
        kept = TopPLogitsWarper(top_p)(None, kept)
    allowed = torch.isfinite(kept)
    sampler = Sampler(1.0, top_k, top_p, seed=3)
    drawn = torch.stack([sampler(logits) for _ in range(300)], dim=1)  # (3, 300)
    for row in range(3):
        assert allowed[row, drawn[row]].all()
    if allowed.sum(dim=1).min() > 1:  # a real draw, not an argmax in disguise
        assert any(len(set(drawn[row].tolist())) > 1 for row in range(3))


class Tokens:
    """A tokenizer whose tokens are pieces of text (decode joins them), for the streamer."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


def test_one_prompt_streams_its_text_as_it_comes():
    out = io.StringIO()
    streamer = Streamer(Tokens(["Hel", "lo", " world", "\n", "!"]), 1, out)
    for token in range(3):
        streamer.push(0, token)
    assert out.getvalue() == "Hello world"
    streamer.push(0, 3), streamer.push(0, 4), streamer.finish(0)
    assert out.getvalue() == "Hello world\n!\n"


def test_several_prompts_stream_whole_lines_prefixed_by_their_row():
    out = io.StringIO()
    streamer = Streamer(Tokens(["a", "b\nc", "d", "\n"]), 2, out)
    streamer.push(0, 0), streamer.push(1, 2), streamer.push(0, 1)
    assert out.getvalue() == "[0] ab\n"
    streamer.push(1, 3), streamer.finish(1), streamer.finish(0)
    assert out.getvalue() == "[0] ab\n[1] d\n[0] c\n"


def test_a_token_that_ends_inside_a_character_waits_for_the_rest():
    class Bytes(Tokens):  # token 1 is the first byte of "é", token 2 its second
        def decode(self, ids, skip_special_tokens=True):
            return "caf\ufffd" if ids == [0, 1] else "".join(self.pieces[i] for i in ids)

    out = io.StringIO()
    streamer = Streamer(Bytes(["caf", "", "é"]), 1, out)
    streamer.push(0, 0), streamer.push(0, 1)
    assert out.getvalue() == "caf"
    streamer.push(0, 2)
    assert out.getvalue() == "café"
