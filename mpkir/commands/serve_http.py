"""``mpkir serve MODEL --port P``: an OpenAI-style HTTP endpoint on loopback.

``POST /v1/completions`` and ``POST /v1/chat/completions`` (``"stream": true`` streams server-sent
events, ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /health``.  Every request joins the
one running engine (continuous batching); the engine runs on its own thread.  Standard library only.
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

REQUEST_TIMEOUT_S = 600.0


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.kind = kind


class Service:
    """The model, its engine thread and the OpenAI-shaped request handling."""

    def __init__(self, runner, model_name: str | None = None):
        from mpkir.models.engine import BackgroundEngine

        self.runner = runner
        self.tok = runner.tokenizer
        self.name = model_name or runner.loaded.module.model_name or "mpkir"
        self.bg = BackgroundEngine(runner.engine)
        self.created = int(time.time())

    def close(self) -> None:
        self.bg.close()

    # ------------------------------------------------------------------ request → engine
    def _sampling(self, body: dict):
        from mpkir.models.engine import SamplingParams

        d = self.runner.default_sampling
        try:
            temp = float(body["temperature"]) if body.get("temperature") is not None else d.temperature
            top_p = float(body["top_p"]) if body.get("top_p") is not None else d.top_p
            top_k = int(body["top_k"]) if body.get("top_k") is not None else d.top_k
            seed = int(body["seed"]) if body.get("seed") is not None else d.seed
        except (TypeError, ValueError) as e:
            raise ApiError(400, f"bad sampling parameter: {e}") from None
        sp = SamplingParams(max(temp, 0.0), top_k, top_p, seed)
        try:
            sp.validate()
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        return sp

    def _prompt_ids(self, body: dict, chat: bool) -> list[int]:
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise ApiError(400, "'messages' must be a non-empty list")
            clean = []
            for m in msgs:
                if not isinstance(m, dict) or "role" not in m:
                    raise ApiError(400, "each message needs 'role' and 'content'")
                content = m.get("content") or ""
                if isinstance(content, list):  # [{"type": "text", "text": ...}]
                    content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
                clean.append({"role": str(m["role"]), "content": str(content)})
            if self.tok.chat_template is None:
                text = "".join(f"{m['role']}: {m['content']}\n" for m in clean) + "assistant:"
                return self.tok.encode(text)
            return self.tok.encode_chat(clean)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.tok.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise ApiError(400, "'prompt' must be a string, a list of one string, or a list of token ids")

    def submit(self, body: dict, chat: bool):
        """(request, queue of (token ids) chunks ending with None, stop strings)."""
        if body.get("n", 1) != 1:
            raise ApiError(400, "only n = 1 is supported")
        ids = self._prompt_ids(body, chat)
        max_new = body.get("max_completion_tokens", body.get("max_tokens"))
        max_new = 16 if max_new is None and not chat else max_new
        if max_new is None:
            max_new = self.runner.engine.cfg.max_seq_len - len(ids)
        try:
            max_new = int(max_new)
        except (TypeError, ValueError):
            raise ApiError(400, "'max_tokens' must be an integer") from None
        if max_new < 1:
            raise ApiError(400, "'max_tokens' must be at least 1")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else [str(s) for s in stop]
        q: queue.Queue = queue.Queue()

        def on_tokens(r, new):
            q.put(list(new) if new else None)

        try:
            req = self.bg.submit(
                ids,
                max_new,
                self._sampling(body),
                on_tokens=on_tokens,
                stop_ids=() if body.get("ignore_eos") else None,
            )
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        return req, q, stop

    def events(self, req, q: queue.Queue, stop: list[str]):
        """Yield text deltas as tokens arrive; the request's finish reason is set when this ends."""
        dec = self.tok.stream()
        text = ""
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        while True:
            try:
                item = q.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.runner.engine.cancel(req)
                raise ApiError(504, "generation timed out", "timeout") from None
            if item is None:
                if req.finish_reason == "error":
                    raise ApiError(500, f"engine failed: {self.bg.error}", "server_error")
                rest = dec.flush()
                if stop and rest:
                    joined = text + rest
                    hit = min((joined.find(s) for s in stop if s in joined), default=-1)
                    if hit >= 0:
                        rest = joined[len(text) : hit] if hit > len(text) else ""
                        req.finish_reason = "stop"
                if rest:
                    yield rest
                return
            delta = dec.feed(item)
            if stop and delta:
                joined = text + delta
                hit = min((joined.find(s) for s in stop if s in joined), default=-1)
                if hit >= 0:
                    if hit > len(text):
                        yield joined[len(text) : hit]
                    req.finish_reason = "stop"
                    self.runner.engine.cancel(req)
                    return
                text = joined
            if delta:
                yield delta

    def usage(self, req) -> dict:
        return {
            "prompt_tokens": len(req.prompt),
            "completion_tokens": len(req.output),
            "total_tokens": len(req.prompt) + len(req.output),
        }

    @staticmethod
    def finish(req) -> str:
        return "length" if req.finish_reason == "length" else "stop"


class Handler(BaseHTTPRequestHandler):
    server_version = "mpkir"
    protocol_version = "HTTP/1.1"
    service: Service  # set on the subclass by make_server

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet unless asked
        if getattr(self.server, "verbose", False):
            sys.stderr.write(f"{self.address_string()} - {fmt % args}\n")

    # ------------------------------------------------------------------ plumbing
    def _json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: ApiError) -> None:
        self._json(e.status, {"error": {"message": str(e), "type": e.kind, "code": e.status}})

    def _body(self) -> dict:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError as e:
            raise ApiError(400, f"invalid JSON body: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def do_GET(self) -> None:
        s = self.service
        if self.path in ("/health", "/v1/health"):
            self._json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self._json(
                200,
                {
                    "object": "list",
                    "data": [{"id": s.name, "object": "model", "created": s.created, "owned_by": "mpkir"}],
                },
            )
        else:
            self._error(ApiError(404, f"no route {self.path}", "not_found"))

    def do_POST(self) -> None:
        try:
            body = self._body()
            if self.path == "/v1/completions":
                self._complete(body, chat=False)
            elif self.path == "/v1/chat/completions":
                self._complete(body, chat=True)
            else:
                raise ApiError(404, f"no route {self.path}", "not_found")
        except ApiError as e:
            self._error(e)
        except (BrokenPipeError, ConnectionResetError):
            pass

    # ------------------------------------------------------------------ completions
    def _complete(self, body: dict, chat: bool) -> None:
        s = self.service
        req, q, stop = s.submit(body, chat)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        base = {"id": rid, "created": created, "model": body.get("model") or s.name}
        if not body.get("stream"):
            try:
                text = "".join(s.events(req, q, stop))
            except ApiError:
                s.runner.engine.cancel(req)
                raise
            if chat:
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": s.finish(req),
                    "logprobs": None,
                }
                obj = {**base, "object": "chat.completion", "choices": [choice]}
            else:
                choice = {"index": 0, "text": text, "finish_reason": s.finish(req), "logprobs": None}
                obj = {**base, "object": "text_completion", "choices": [choice]}
            obj["usage"] = s.usage(req)
            self._json(200, obj)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None, first: bool = False) -> dict:
            if chat:
                d: dict = (
                    {"role": "assistant", "content": ""}
                    if first
                    else ({} if delta is None else {"content": delta})
                )
                c = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
            else:
                c = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            return {**base, "object": kind, "choices": [c]}

        def send(obj) -> None:
            self.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")
            self.wfile.flush()

        try:
            if chat:
                send(chunk(None, None, first=True))
            for delta in s.events(req, q, stop):
                send(chunk(delta, None))
            final = chunk(None, s.finish(req))
            if body.get("stream_options", {}).get("include_usage"):
                final["usage"] = s.usage(req)
            send(final)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except ApiError as e:
            send({"error": {"message": str(e), "type": e.kind, "code": e.status}})
        except (BrokenPipeError, ConnectionResetError):
            s.runner.engine.cancel(req)  # the client went away: free its slot and pages


def make_server(
    runner, host: str = "127.0.0.1", port: int = 0, model_name: str | None = None, verbose: bool = False
) -> tuple[ThreadingHTTPServer, Service]:
    """A server bound to ``host:port`` (port 0: any free port); call ``serve_forever`` on a thread."""
    service = Service(runner, model_name)
    handler = type("BoundHandler", (Handler,), {"service": service})
    srv = ThreadingHTTPServer((host, port), handler)
    srv.daemon_threads = True
    srv.verbose = verbose  # type: ignore[attr-defined]
    return srv, service


def run(args) -> int:
    from mpkir.commands.generate import _Progress
    from mpkir.models.runner import open_runner

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        from mpkir.commands import UsageError

        raise UsageError("serve listens on loopback only (--host 127.0.0.1, localhost or ::1)")
    prog = _Progress(not args.no_progress)
    runner = open_runner(
        args.model,
        mpk=args.mpk,
        device=args.device,
        precision=args.precision,
        batch=args.batch,
        step_tokens=args.step_tokens,
        max_seq_len=args.max_seq_len,
        speculative=args.speculative,
        progress=prog,
        kernel_sampling=args.kernel_sampling,
        kernel_pages=args.kernel_pages,
        numerics=args.numerics,
    )
    prog.close()
    if runner.tokenizer is None:
        from mpkir.diagnostics import error

        raise error(f"{runner.loaded.checkpoint} has no tokenizer: serve needs one")
    srv, service = make_server(runner, args.host, args.port, args.name, args.verbose)
    host, port = srv.server_address[:2]
    print(
        f"serving {service.name} on http://{host}:{port}/v1 ({runner.describe()})",
        file=sys.stderr,
        flush=True,
    )
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        while t.is_alive():
            t.join(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        srv.shutdown()
        srv.server_close()
        service.close()
    return 0


def register(sub) -> None:
    from mpkir.commands.generate import add_kernel_switches

    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-style HTTP API on loopback",
        description="Load MODEL (checkpoint directory, .gguf, or 'default') and answer OpenAI-style "
        'POST /v1/completions and /v1/chat/completions (streaming with "stream": true) on '
        "127.0.0.1; concurrent requests share the engine through continuous batching.",
    )
    p.add_argument(
        "model",
        nargs="?",
        default="default",
        metavar="MODEL",
        help="checkpoint directory, .gguf file, or 'default' (SmolLM2-135M-Instruct)",
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--host", default="127.0.0.1", help="loopback address to bind (default 127.0.0.1)")
    p.add_argument("--name", default=None, help="model id reported by /v1/models")
    p.add_argument(
        "--mpk", metavar="FILE", help="model file to compile (default: the architecture's example)"
    )
    p.add_argument("--batch", type=int, default=4, help="requests in flight at once (default 4)")
    p.add_argument("--step-tokens", type=int, default=None, help="tokens per step (default: 64 on the CPU)")
    p.add_argument(
        "--max-seq-len", type=int, default=None, help="longest sequence (default: the model file's)"
    )
    p.add_argument("--speculative", action="store_true", help="prompt-lookup speculative decoding")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    add_kernel_switches(p)
    p.add_argument("--precision", choices=("f32", "bf16"), default="f32")
    p.add_argument("--verbose", action="store_true", help="log every HTTP request to stderr")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
