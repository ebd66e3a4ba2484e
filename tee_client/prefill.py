"""tee-client prefill: tokenize in the TEE, run one forward, report logits, time and stats."""

import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from protocol.errors import ModelMismatch
from tee_client.backends import make_ops
from tee_client.model import Llama
from tee_client.settings import PrefillSettings
from tee_client.stats import Stats

DEFAULT_PROMPTS = ["The capital of France is"]


def read_prompts(settings: PrefillSettings) -> list[str]:
    prompts = list(settings.prompt or [])
    if settings.prompt_path:
        text = Path(settings.prompt_path).read_text(encoding="utf-8")
        prompts += [line for line in text.splitlines() if line.strip()]
    return prompts or DEFAULT_PROMPTS


def encode_batch(tokenizer, prompts: list[str], batch_size: int, length: int):
    """Prompts cycled to fill the batch, each right-padded or truncated to `length`."""
    rows = [tokenizer(p)["input_ids"][:length] for p in itertools.islice(itertools.cycle(prompts), batch_size)]
    if any(len(r) == 0 for r in rows):
        raise ValueError("a prompt is empty after tokenization")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    input_ids = torch.full((batch_size, length), pad, dtype=torch.int64)
    attention_mask = torch.zeros((batch_size, length), dtype=torch.int64)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask, [len(r) for r in rows]


def run_prefill(settings: PrefillSettings) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The result JSON, and the logits, input_ids and attention_mask of the timed run."""
    prompts = read_prompts(settings)  # a bad prompt file fails before any model loads
    ops = make_ops(settings)
    try:
        init_stats = Stats()
        with init_stats.recording():
            spec = ops.init()
        check_pinned(spec, settings.model_fingerprint)
        model = Llama(spec, ops)
        input_ids, attention_mask, lengths = encode_batch(
            spec.tokenizer, prompts, settings.tee_batch_size, settings.prefill_length
        )
        for _ in range(settings.warmup):
            model.forward(input_ids, attention_mask)
        runs = [timed_forward(model, input_ids, attention_mask) for _ in range(settings.repeat)]
    finally:
        ops.close()
    seconds = [r[0] for r in runs]
    elapsed, stats, logits = sorted(runs, key=lambda r: r[0])[len(runs) // 2]  # the median run
    stats.methods.update(init_stats.methods)  # Init shows in `rpc`, outside the timed forward
    result = {
        "mode": "prefill",
        "backend": settings.backend,
        "endpoint": settings.gpu_endpoint if settings.backend == "remote" else None,
        "model": spec.name,
        "fingerprint": spec.fingerprint,
        "dtype": str(spec.dtype).removeprefix("torch."),
        "batch_size": settings.tee_batch_size,
        "prefill_length": settings.prefill_length,
        "actual_lengths": lengths,
        "time_seconds": elapsed,
        "runs_seconds": seconds,
        "warmup_runs": settings.warmup,
        "total_tokens": input_ids.numel(),
        "throughput_tokens_per_sec": input_ids.numel() / elapsed,
        "predictions": predictions(spec.tokenizer, prompts, logits, lengths),
        **stats.summary(int(elapsed * 1e9)),
    }
    return result, logits, input_ids, attention_mask


def check_pinned(spec, pinned: str | None) -> None:
    """With a pinned fingerprint, refuse any other model before a single token is sent."""
    if pinned and not spec.fingerprint.startswith(pinned.lower()):
        raise ModelMismatch(
            f"the model is {spec.name} with fingerprint {spec.fingerprint[:16]}, not the pinned {pinned[:16]}"
        )


def timed_forward(model: Llama, input_ids, attention_mask):
    stats = Stats()
    with stats.recording():
        t0 = time.perf_counter_ns()
        logits = model.forward(input_ids, attention_mask)
        elapsed = (time.perf_counter_ns() - t0) / 1e9
    return elapsed, stats, logits


def predictions(tokenizer, prompts, logits, lengths) -> list[dict]:
    out = []
    for i, (prompt, n) in enumerate(zip(itertools.cycle(prompts), lengths)):
        token_id = int(logits[i, n - 1].argmax())
        out.append({"prompt": prompt, "next_token_id": token_id, "next_token": tokenizer.decode([token_id])})
    return out


def save_outputs(settings: PrefillSettings, result: dict, logits, input_ids, attention_mask) -> None:
    if settings.tee_result_path:
        Path(settings.tee_result_path).write_text(json.dumps(result, indent=2) + "\n")
    if settings.save_logits:
        np.savez(
            settings.save_logits,
            logits=logits.float().numpy(),
            input_ids=input_ids.numpy(),
            attention_mask=attention_mask.numpy(),
        )


def summary(result: dict) -> str:
    t, pct, data = result["timing"], result["timing_percentage"], result["data_transfer"]
    lines = [
        f"prefill  backend={result['backend']}  model={result['model']} ({result['fingerprint'][:16]})  "
        f"dtype={result['dtype']}" + (f"  endpoint={result['endpoint']}" if result["endpoint"] else ""),
        f"  batch {result['batch_size']} x length {result['prefill_length']} (real tokens {result['actual_lengths']})",
        f"  time {result['time_seconds'] * 1000:.1f} ms (median of {len(result['runs_seconds'])}, "
        f"after {result['warmup_runs']} warm-up), {result['throughput_tokens_per_sec']:.1f} tokens/s",
        f"  transfer {t['transfer_ms']:.1f} ms ({pct['transfer']:.1f}%)  gpu compute {t['gpu_compute_ms']:.1f} ms "
        f"({pct['gpu_compute']:.1f}%)  tee compute {t['tee_compute_ms']:.1f} ms ({pct['tee_compute']:.1f}%)  "
        f"other {t['other_ms']:.1f} ms",
        f"  data to gpu {data['to_gpu_mb']:.1f} MB, to cpu {data['to_cpu_mb']:.1f} MB",
        "  method       calls   sent MB   recv MB   rtt p50 ms   rtt p99 ms   total ms   server ms",
    ]
    for method, m in result["rpc"].items():
        lines.append(
            f"  {method:<11}{m['calls']:>6}{m['bytes_sent'] / 1e6:>10.2f}{m['bytes_received'] / 1e6:>10.2f}"
            f"{m['rtt_ms']['p50']:>13.3f}{m['rtt_ms']['p99']:>13.3f}{m['rtt_ms']['total']:>11.1f}"
            f"{m['server_compute_ms']:>12.1f}"
        )
    for p in result["predictions"]:
        lines.append(f"  {p['prompt']!r} -> {p['next_token']!r} (id {p['next_token_id']})")
    return "\n".join(lines)
