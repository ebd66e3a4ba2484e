"""tee-client generate: prefill the prompts, then decode one token per row per step; text streams as it comes.

Sampling runs here, in the TEE, from the logits the split produced (Sampler). The KV cache lives
here too (tee_client.model.KVCache): the server stays stateless, a resend is as safe as in a
prefill, and every privacy mode and backend works unchanged. A decode step sends one row per
unfinished sequence to each linear op (two calls per layer in plain mode, four in the privacy
modes and with --verify; see Llama.decode) and attends to the cache locally; a finished row
leaves the batch and costs nothing after.
"""

import itertools
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TextIO

import numpy as np
import torch

from protocol.errors import UsageError
from tee_client.model import Llama
from tee_client.ops import make_ops
from tee_client.prefill import (
    check_finite,
    check_length,
    check_writable,
    context_length,
    encode_batch,
    identity,
    prepare,
    read_prompts,
    start,
    write_result,
)
from tee_client.settings import GenerateSettings
from tee_client.stats import Stats

# ---- sampling -----------------------------------------------------------------------------------


class Sampler:
    """The next token per row from logits (B, vocab), as transformers' sampling does: temperature, then top-k,
    then top-p, then one multinomial draw; temperature 0 is greedy (argmax). Reproducible: one seeded generator."""

    def __init__(self, temperature: float, top_k: int, top_p: float, seed: int):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature == 0:
            return logits.argmax(dim=-1)
        scores = logits.float() / self.temperature
        if 0 < self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, -torch.inf)
        if self.top_p < 1.0:
            ascending, order = torch.sort(scores, dim=-1)
            cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative <= 1 - self.top_p
            drop[:, -1] = False  # the likeliest token always stays
            scores = scores.masked_fill(drop.scatter(1, order, drop), -torch.inf)
        probs = scores.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]


# ---- streaming ------------------------------------------------------------------------------------


class Streamer:
    """Writes each row's new text as it is produced. One row: the text itself. Several: each completed line as
    `[i] line`, i the row's number from 0, and a row's last partial line when it finishes; so rows interleave by
    line, never inside one. A token that ends inside a multi-byte character waits for the next."""

    def __init__(self, tokenizer, rows: int, out: TextIO | None):
        self.tokenizer, self.out, self.single = tokenizer, out, rows == 1
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.shown = [0] * rows  # characters of each row's text already written (or buffered)
        self.pending = [""] * rows  # several rows: the current partial line

    def text(self, row: int) -> str:
        return self.tokenizer.decode(self.ids[row], skip_special_tokens=True)

    def push(self, row: int, token_id: int) -> None:
        self.ids[row].append(token_id)
        text = self.text(row)
        if text.endswith("\ufffd"):  # half a character so far
            return
        new, self.shown[row] = text[self.shown[row] :], len(text)
        if self.single:
            self.write(new)
            return
        *lines, self.pending[row] = (self.pending[row] + new).split("\n")
        self.write("".join(f"[{row}] {line}\n" for line in lines))

    def finish(self, row: int) -> None:
        if self.single:
            self.write("\n")
        elif self.pending[row]:
            self.write(f"[{row}] {self.pending[row]}\n")
            self.pending[row] = ""

    def write(self, text: str) -> None:
        if self.out is not None and text:
            self.out.write(text)
            self.out.flush()


# ---- the run ----------------------------------------------------------------------------------------


@dataclass
class Phase:
    """One phase's Stats, online time (ns) and offline time (the pads drawn before each of its forwards)."""

    stats: Stats = field(default_factory=Stats)
    step_ns: list[int] = field(default_factory=list)

    @contextmanager
    def step(self, offline_ns: int):
        """Record and time one forward (and the sampling after it); its pads took offline_ns before."""
        self.stats.offline_ns += offline_ns
        with self.stats.recording():
            t0 = time.perf_counter_ns()
            yield
            self.step_ns.append(time.perf_counter_ns() - t0)

    def summary(self) -> dict:
        return {"steps": len(self.step_ns), **self.stats.summary(sum(self.step_ns))}


@dataclass
class Generation:
    """One generate's outcome: each row's new tokens (in the streamer), why it stopped, and the two phases."""

    streamer: Streamer
    finish_reasons: list[str | None]
    prefill: Phase = field(default_factory=Phase)
    decode: Phase = field(default_factory=Phase)


def generate(
    model: Llama,
    sampler: Sampler,
    streamer: Streamer,
    input_ids,
    attention_mask,
    max_new_tokens: int,
    stop_ids: set[int],
) -> Generation:
    """Prefill right-padded prompts into a fresh cache, then decode until every row has stopped."""
    ops, batch_size = model.ops, input_ids.shape[0]
    run = Generation(streamer, [None] * batch_size)

    def sample(logits):
        check_finite(logits)
        return sampler(logits)

    # prefill: the prompts' keys and values into the cache, each row's first new token
    cache = model.new_cache(batch_size, input_ids.shape[1] + max_new_tokens)
    with run.prefill.step(prepare(ops, input_ids.numel(), batch_size)):
        tokens = sample(model.prefill(input_ids, attention_mask, cache))
    rows = torch.arange(batch_size)  # which prompt each cache row belongs to
    # decode: one token per unfinished row per step
    while True:
        for row, token in zip(rows.tolist(), tokens.tolist(), strict=True):
            streamer.push(row, token)
            if token in stop_ids or len(streamer.ids[row]) == max_new_tokens:
                run.finish_reasons[row] = "stop" if token in stop_ids else "length"
                streamer.finish(row)
        going = torch.tensor([run.finish_reasons[r] is None for r in rows.tolist()])
        if not going.any():
            return run
        if not going.all():  # finished rows leave the batch
            keep = going.nonzero()[:, 0]
            cache.keep(keep)
            rows, tokens = rows[keep], tokens[keep]
        with run.decode.step(prepare(ops, len(rows))):
            tokens = sample(model.decode(tokens, cache))


def run_generate(settings: GenerateSettings, out: TextIO | None = None) -> dict:
    """Generate for every prompt, streaming to `out` (None: silent); the result JSON."""
    prompts = read_prompts(settings)
    check_writable(settings.tee_result_path)
    batch_size = settings.tee_batch_size or len(prompts)
    seed = settings.seed if settings.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    ops = make_ops(settings)
    try:
        spec, init_stats = start(ops, settings)
        input_ids, attention_mask, lengths, _ = encode_batch(spec.tokenizer, prompts, batch_size)
        check_room(spec.config, batch_size, max(lengths), settings.max_new_tokens, settings.attention)
        run = generate(
            Llama(spec, ops, settings.attention),
            Sampler(settings.temperature, settings.top_k, settings.top_p, seed),
            Streamer(spec.tokenizer, batch_size, out),
            input_ids,
            attention_mask,
            settings.max_new_tokens,
            set() if settings.ignore_eos else set(spec.eos_token_ids),
        )
        transport = ops.transport()
    finally:
        ops.close()
    run.prefill.stats.methods.update(init_stats.methods)  # Init shows in the prefill's `rpc`, outside its time
    return result_json(settings, spec, transport, prompts, lengths, seed, run)


def check_room(config, batch: int, longest: int, new_tokens: int, attention: str = "tee") -> None:
    """The longest prompt plus the new tokens must fit the model's context (and the prefill in memory)."""
    context = context_length(config)
    if longest + new_tokens > context:
        raise UsageError(
            f"a prompt of {longest} tokens plus --max-new-tokens {new_tokens} is past the model's context of "
            f"{context} tokens; ask for at most {max(context - longest, 0)} new tokens, or shorten the prompt"
        )
    check_length(config, batch, longest, attention)


def result_json(settings, spec, transport, prompts, lengths, seed, run: Generation) -> dict:
    streamer, prefill, decode = run.streamer, run.prefill, run.decode
    new_tokens = sum(len(ids) for ids in streamer.ids)
    total_ns = sum(prefill.step_ns) + sum(decode.step_ns)
    per_token = np.array(decode.step_ns or [0]) / 1e6
    return {
        "mode": "generate",
        **identity(settings, spec, transport, prefill.stats.verify_checks + decode.stats.verify_checks),
        "batch_size": len(lengths),
        "prompt_lengths": lengths,
        "max_new_tokens": settings.max_new_tokens,
        "sampling": {
            "temperature": settings.temperature,
            "top_k": settings.top_k,
            "top_p": settings.top_p,
            "seed": seed,
            "ignore_eos": settings.ignore_eos,
        },
        "completions": [
            {"prompt": prompt, "token_ids": ids, "text": streamer.text(row), "finish_reason": reason}
            for row, (prompt, ids, reason) in enumerate(zip(itertools.cycle(prompts), streamer.ids, run.finish_reasons))
        ],
        "new_tokens": new_tokens,
        "time_seconds": total_ns / 1e9,
        "ttft_ms": sum(prefill.step_ns) / 1e6,
        "decode_ms_per_token": {
            "mean": float(per_token.mean()),
            "p50": float(np.percentile(per_token, 50)),
            "p99": float(np.percentile(per_token, 99)),
        },
        "tokens_per_sec": new_tokens / max(total_ns / 1e9, 1e-9),
        "prefill": prefill.summary(),
        "decode": decode.summary(),
    }


def save_result(settings: GenerateSettings, result: dict) -> None:
    if settings.tee_result_path:
        write_result(settings.tee_result_path, result)


def summary(result: dict) -> str:
    d = result["decode_ms_per_token"]
    lines = [
        f"generate  backend={result['backend']}  privacy={result['privacy']}  "
        f"model={result['model']} ({result['fingerprint'][:16]})  dtype={result['dtype']}"
        + (f"  endpoint={result['endpoint']} ({result['transport']})" if result["endpoint"] else ""),
        f"  batch {result['batch_size']}, prompts of {result['prompt_lengths']} tokens, "
        f"{result['new_tokens']} new tokens in {result['time_seconds'] * 1000:.1f} ms "
        f"({result['tokens_per_sec']:.1f} tokens/s)",
        f"  time to first token {result['ttft_ms']:.1f} ms; decode {d['mean']:.1f} ms per step "
        f"(p50 {d['p50']:.1f}, p99 {d['p99']:.1f}) over {result['decode']['steps']} steps",
    ]
    for phase in ("prefill", "decode"):
        t, data = result[phase]["timing"], result[phase]["data_transfer"]
        calls = sum(result[phase]["operation_counts"]["gpu"].values())
        lines.append(
            f"  {phase:<8} transfer {t['transfer_ms']:.1f} ms  gpu compute {t['gpu_compute_ms']:.1f} ms  "
            f"tee compute {t['tee_compute_ms']:.1f} ms  other {t['other_ms']:.1f} ms  "
            f"{calls} calls, {data['total_mb']:.2f} MB"
            + (f"  (offline {t['offline_ms']:.1f} ms)" if t["offline_ms"] else "")
        )
    if result["verify"]:
        lines.append(f"  verified: {result['verify_checks']} checks passed")
    for i, c in enumerate(result["completions"]):
        lines.append(f"  [{i}] {c['prompt']!r} -> {len(c['token_ids'])} tokens ({c['finish_reason']})")
    return "\n".join(lines)
