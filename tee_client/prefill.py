"""tee-client prefill: tokenize in the TEE, run one forward, report logits, time and stats."""

import itertools
import json
import os
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from protocol.errors import ModelMismatch, UsageError
from tee_client.model import Llama, last_positions
from tee_client.ops import make_ops
from tee_client.settings import PrefillSettings
from tee_client.stats import Stats

DEFAULT_PROMPTS = ["The capital of France is"]


def read_prompts(settings: PrefillSettings) -> list[str]:
    prompts = list(settings.prompt or [])
    if settings.prompt_path:
        try:
            text = Path(settings.prompt_path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read the prompt file {settings.prompt_path}: {e}") from None
        from_file = [line for line in text.splitlines() if line.strip()]
        if not from_file:
            raise UsageError(f"the prompt file {settings.prompt_path} holds no prompt (one per non-empty line)")
        prompts += from_file
    return prompts or DEFAULT_PROMPTS


def check_writable(*paths: str | None) -> None:
    """Fail before the prefill, not after it, when an output cannot be written."""
    for path in filter(None, paths):
        if os.path.isdir(path) or path.endswith(os.sep):
            raise UsageError(f"{path} is a folder; give a file name")
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise UsageError(f"cannot write {path}: permission denied")
        if in_place(path):
            continue
        target = Path(os.path.realpath(path))  # where write_whole writes: through a symbolic link
        if not target.parent.is_dir():
            raise UsageError(f"cannot write {path}: the folder {target.parent} does not exist")
        if not os.access(target.parent, os.W_OK):
            raise UsageError(f"cannot write {path}: no write permission in {target.parent}")


def in_place(path: str) -> bool:
    """Whether `path` is written in place, as a plain open would: a device, a FIFO or a pipe (after any links), or
    this process's own stdout or stderr (/dev/stdout sent to a file): what a new file renamed over it would miss."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return True
    for fd in (1, 2):
        try:
            if os.path.samestat(st, os.fstat(fd)):
                return True
        except OSError:
            pass
    return False


def write_whole(path: str, write: Callable[[BinaryIO], object]) -> None:
    """Write `path` whole or not at all: into a new file beside it, renamed over it once complete, so that a run
    stopped while writing (Ctrl-C, SIGTERM, a full disk) leaves no half-written result where a whole one belongs,
    and no leftover. A symbolic link is written through (its target replaced, the link kept); a file that is
    there keeps its permissions (a new one gets the umask's); `in_place` paths are written as a plain open
    would."""
    check_writable(path)  # the same rules as before the run: things may have changed since
    try:
        if in_place(path):
            with open(path, "wb") as f:
                write(f)
            return
        target = Path(os.path.realpath(path))
        part = target.with_name(f".tsqp-{secrets.token_hex(4)}.part")  # short: a long target name stays legal
        with open(part, "xb") as f:
            try:
                if target.exists():
                    os.chmod(f.fileno(), stat.S_IMODE(target.stat().st_mode))
                write(f)
                f.close()
                os.replace(part, target)
            except BaseException:
                part.unlink(missing_ok=True)
                raise
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None


def write_result(path: str, result: dict) -> None:
    """The result JSON (--output), written whole."""
    write_whole(path, lambda f: f.write(json.dumps(result, indent=2).encode() + b"\n"))


def check_finite(logits: torch.Tensor) -> None:
    """Logits that hold NaN or inf are no prediction: one line saying so, not a token read off them."""
    if not bool(torch.isfinite(logits).all()):
        raise UsageError(
            "the model's logits hold NaN or inf (with --dtype float16, activations past 65504 overflow: "
            "bfloat16 or float32 keep the range)"
        )


def context_length(config) -> int:
    """The most positions the model takes: max_position_embeddings, times the factor for dynamic NTK rope."""
    params = getattr(config, "rope_parameters", None) or {}
    return int(
        config.max_position_embeddings * (params.get("factor", 1) if params.get("rope_type") == "dynamic" else 1)
    )


def check_length(config, batch: int, length: int, attention: str = "tee") -> None:
    """Refuse a length past the model's context, or one whose attention would not fit in memory."""
    context = context_length(config)
    if length > context:
        raise UsageError(f"--length {length} is past the model's context of {context} tokens")
    # the largest buffers of one forward: the mask, the logits, and with --attention server a layer's scores and
    # probabilities (the fused kernel here keeps no S x S of its own)
    scores = 2 * config.num_attention_heads * length**2 if attention == "server" else 0
    need = 4 * batch * (scores + length**2 + 2 * length * config.vocab_size)
    available = available_memory()
    if available is not None and need > available:
        raise UsageError(
            f"batch {batch} x length {length} needs about {need / 2**30:.1f} GiB at once, "
            f"more than the {available / 2**30:.1f} GiB available; use a shorter --length or a smaller --batch-size"
        )


def available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def encode_batch(tokenizer, prompts: list[str], batch_size: int, length: int | None = None):
    """Prompts cycled to fill the batch, each right-padded or truncated to `length` (None: the longest prompt's)."""
    full = [tokenizer(p)["input_ids"] for p in itertools.islice(itertools.cycle(prompts), batch_size)]
    length = length or max(len(r) for r in full)
    rows = [r[:length] for r in full]
    if any(len(r) == 0 for r in rows):
        raise ValueError("a prompt is empty after tokenization")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    input_ids = torch.full((batch_size, length), pad, dtype=torch.int64)
    attention_mask = torch.zeros((batch_size, length), dtype=torch.int64)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask, [len(r) for r in rows], [len(r) for r in full]


def run_prefill(settings: PrefillSettings) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The result JSON, and the logits, input_ids and attention_mask of the timed run."""
    prompts = read_prompts(settings)  # a bad prompt file or output path fails before any model loads
    check_writable(settings.tee_result_path, settings.save_logits)
    batch_size = settings.tee_batch_size or len(prompts)
    ops = make_ops(settings)
    try:
        spec, init_stats = start(ops, settings)
        check_length(spec.config, batch_size, settings.prefill_length, settings.attention)
        model = Llama(spec, ops, settings.attention)
        keep = settings.logits_kept
        rows = batch_size * settings.prefill_length
        head_rows = batch_size if keep == "last" else rows
        offline_ns = prepare(ops, rows, head_rows)  # the first forward's pads: drawn before the prompt is tokenized
        input_ids, attention_mask, lengths, full_lengths = encode_batch(
            spec.tokenizer, prompts, batch_size, settings.prefill_length
        )
        for _ in range(settings.warmup):
            model.forward(input_ids, attention_mask, keep)
            offline_ns = prepare(ops, rows, head_rows)
        runs = []
        for _ in range(settings.repeat):
            runs.append(timed_forward(model, input_ids, attention_mask, offline_ns, keep))
            offline_ns = prepare(ops, rows, head_rows)
        transport = ops.transport()
    finally:
        ops.close()
    seconds = [r[0] for r in runs]
    elapsed, stats, logits = sorted(runs, key=lambda r: r[0])[len(runs) // 2]  # the median run
    check_finite(logits if keep == "last" else logits[attention_mask.bool()])  # the real positions'
    stats.methods.update(init_stats.methods)  # Init shows in `rpc`, outside the timed forward
    result = {
        "mode": "prefill",
        **identity(settings, spec, transport, stats.verify_checks),
        "batch_size": batch_size,
        "prefill_length": settings.prefill_length,
        "actual_lengths": lengths,
        "logits": keep,
        "time_seconds": elapsed,
        "runs_seconds": seconds,
        "warmup_runs": settings.warmup,
        "total_tokens": input_ids.numel(),
        "throughput_tokens_per_sec": input_ids.numel() / elapsed,
        "predictions": predictions(spec.tokenizer, prompts, input_ids, logits, lengths, full_lengths),
        **stats.summary(int(elapsed * 1e9)),
    }
    return result, logits, input_ids, attention_mask


def start(ops, settings) -> tuple:
    """Init, recorded apart from any forward, and the pinned fingerprint checked: (ModelSpec, its Stats)."""
    init_stats = Stats()
    with init_stats.recording():
        spec = ops.init()
    check_pinned(spec, settings.model_fingerprint)
    return spec, init_stats


def identity(settings, spec, transport: str | None, verify_checks: int) -> dict:
    """The result JSON's fields on where and how it ran, and on which model (prefill and generate alike)."""
    in_process_only = settings.backend == "tee-only"
    return {
        "backend": settings.backend,
        "endpoint": settings.gpu_endpoint if settings.backend == "remote" else None,
        "transport": transport,
        "privacy": None if in_process_only else settings.privacy,
        "attention": settings.attention,
        "verify": settings.verify and not in_process_only,
        "verify_checks": verify_checks,
        "model": spec.name,
        "fingerprint": spec.fingerprint,
        "dtype": str(spec.dtype).removeprefix("torch."),
    }


def check_pinned(spec, pinned: str | None) -> None:
    """With a pinned fingerprint, refuse any other model before a single token is sent."""
    if pinned and not spec.fingerprint.startswith(pinned.lower()):
        raise ModelMismatch(
            f"the model is {spec.name} with fingerprint {spec.fingerprint[:16]}, not the pinned {pinned[:16]}"
        )


def prepare(ops, rows: int, head_rows: int | None = None) -> int:
    """The offline phase of a privacy mode (pads for the next forward of `rows` tokens, `head_rows` of them
    through LMHead); its ns."""
    t0 = time.perf_counter_ns()
    ops.prepare(rows, head_rows)
    return time.perf_counter_ns() - t0


def timed_forward(model: Llama, input_ids, attention_mask, offline_ns: int = 0, keep: str = "all"):
    stats = Stats(offline_ns=offline_ns)
    with stats.recording():
        t0 = time.perf_counter_ns()
        logits = model.forward(input_ids, attention_mask, keep)
        elapsed = (time.perf_counter_ns() - t0) / 1e9
    return elapsed, stats, logits


def predictions(tokenizer, prompts, input_ids, logits, lengths, full_lengths) -> list[dict]:
    """Per row: its prompt, the next token, and what was used of a prompt cut to --length.

    `logits` is (B, N, vocab), or (B, 1, vocab) holding each row's last real position only (--logits last).
    """
    out = []
    for i, (prompt, n, full) in enumerate(zip(itertools.cycle(prompts), lengths, full_lengths)):
        token_id = int(logits[i, n - 1 if logits.shape[1] > 1 else 0].argmax())
        row = {"prompt": prompt, "next_token_id": token_id, "next_token": tokenizer.decode([token_id])}
        if n < full:
            row["truncated_to"] = tokenizer.decode(input_ids[i, :n], skip_special_tokens=True)
        out.append(row)
    return out


def save_outputs(settings: PrefillSettings, result: dict, logits, input_ids, attention_mask) -> None:
    if settings.save_logits:  # first: the result JSON, written last, is the run's word that it finished
        # --logits last: [B, 1, vocab] under its own name, with the position each row came from
        kept = (
            {"logits": logits.float().numpy()}
            if settings.logits_kept == "all"
            else {"last_logits": logits.float().numpy(), "last_positions": last_positions(attention_mask).numpy()}
        )
        ids, mask = input_ids.numpy(), attention_mask.numpy()
        write_whole(settings.save_logits, lambda f: np.savez(f, **kept, input_ids=ids, attention_mask=mask))
    if settings.tee_result_path:
        write_result(settings.tee_result_path, result)


def summary(result: dict) -> str:
    t, pct, data = result["timing"], result["timing_percentage"], result["data_transfer"]
    lines = [
        f"prefill  backend={result['backend']}  privacy={result['privacy']}  attention={result['attention']}  "
        f"model={result['model']} ({result['fingerprint'][:16]})  "
        f"dtype={result['dtype']}"
        + (f"  endpoint={result['endpoint']} ({result['transport']})" if result["endpoint"] else ""),
        f"  batch {result['batch_size']} x length {result['prefill_length']} (real tokens {result['actual_lengths']})",
        f"  time {result['time_seconds'] * 1000:.1f} ms (median of {len(result['runs_seconds'])}, "
        f"after {result['warmup_runs']} warm-up), {result['throughput_tokens_per_sec']:.1f} tokens/s",
        f"  transfer {t['transfer_ms']:.1f} ms ({pct['transfer']:.1f}%)  gpu compute {t['gpu_compute_ms']:.1f} ms "
        f"({pct['gpu_compute']:.1f}%)  tee compute {t['tee_compute_ms']:.1f} ms ({pct['tee_compute']:.1f}%)  "
        f"other {t['other_ms']:.1f} ms",
        f"  data to gpu {data['to_gpu_mb']:.1f} MB, to cpu {data['to_cpu_mb']:.1f} MB",
    ]
    if result["verify"]:
        lines.append(f"  verified: {result['verify_checks']} checks passed, {t['verify_ms']:.1f} ms")
    retries = sum(m["retries"] for m in result["rpc"].values())
    if retries:
        lines.append(
            f"  {retries} resend(s) after no reply: {t['retry_wait_ms']:.1f} ms waited, not counted as transfer"
        )
    lines.append("  method       calls   sent MB   recv MB   rtt p50 ms   rtt p99 ms   total ms   server ms")
    for method, m in result["rpc"].items():
        lines.append(
            f"  {method:<11}{m['calls']:>6}{m['bytes_sent'] / 1e6:>10.2f}{m['bytes_received'] / 1e6:>10.2f}"
            f"{m['rtt_ms']['p50']:>13.3f}{m['rtt_ms']['p99']:>13.3f}{m['rtt_ms']['total']:>11.1f}"
            f"{m['server_compute_ms']:>12.1f}"
        )
    for p in result["predictions"]:
        used = f"{p['truncated_to']!r} (cut to --length)" if "truncated_to" in p else repr(p["prompt"])
        lines.append(f"  {used} -> {p['next_token']!r} (id {p['next_token_id']})")
    return "\n".join(lines)
