"""`moonlet chat`: a streaming terminal chat that keeps the conversation.

``--url`` talks to a running server (moonlet's or any Anthropic-compatible one) over the Messages
API with httpx; ``--model`` runs the engine in this process. ``--thinking-budget N`` caps the
reasoning at N tokens (the engine's ``thinking_token_budget``; over HTTP ``thinking.budget_tokens``). ``--prompt`` (repeatable) sends those
turns and exits instead of reading the terminal. In the terminal: ``/reset`` forgets the
conversation, ``/exit`` (or Ctrl-D) leaves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from ..engine.config import add_engine_cli_args
from .serve import engine_args, resolve_model

DIM, RESET = "\033[2m", "\033[0m"


def register(sub) -> None:
    p = sub.add_parser("chat", help="streaming terminal chat with a model (in-process or over HTTP)",
                       description="Chat with a model. --url uses a server's Anthropic Messages API; --model "
                                   "(default: the bundled moonlet-tiny) runs the engine in this process.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="checkpoint directory to run in-process")
    src.add_argument("--url", default=None, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", default=os.environ.get("MOONLET_API_KEY") or os.environ.get("ANTHROPIC_API_KEY"),
                   help="key for --url (default $MOONLET_API_KEY or $ANTHROPIC_API_KEY)")
    p.add_argument("--model-name", default="moonlet", help="the model field sent with --url requests")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--prompt", action="append", default=None,
                   help="send this user turn (repeat for several) and exit instead of reading the terminal")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=None, help="default: the server's / 1.0")
    p.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="ask for reasoning (--thinking) or not (--no-thinking); default: the template's")
    p.add_argument("--thinking-budget", type=int, default=None, metavar="N",
                   help="turn thinking on and cap it at N tokens, after which the reply's thinking is closed "
                        "and the answer follows (with --url: thinking.budget_tokens, which the Messages API "
                        "wants >= 1024 and below --max-tokens)")
    add_engine_cli_args(p)
    p.set_defaults(func=run)


class _Printer:
    """Writes reasoning dimmed (on a terminal) and answer text plainly."""

    def __init__(self, out):
        self.out, self.color = out, out.isatty()
        self.mode = None

    def write(self, kind: str, text: str) -> None:
        if not text:
            return
        if kind != self.mode:
            if self.mode == "thinking":
                self.out.write((RESET if self.color else "") + "\n")
            if kind == "thinking":
                self.out.write(DIM if self.color else "[thinking] ")
            self.mode = kind
        self.out.write(text)
        self.out.flush()

    def end(self) -> None:
        if self.mode == "thinking" and self.color:
            self.out.write(RESET)
        self.out.write("\n")
        self.out.flush()
        self.mode = None


async def _sse(response):
    event = None
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            yield event, json.loads(line[5:].strip())


class RemoteChat:
    """A conversation with a server over the Anthropic Messages API."""

    def __init__(self, args):
        import httpx

        self.args = args
        self.url = args.url.rstrip("/") + "/v1/messages"
        headers = {"anthropic-version": "2023-06-01", "content-type": "application/json"}
        if args.api_key:
            headers["x-api-key"] = args.api_key
        self.client = httpx.AsyncClient(headers=headers, timeout=None)
        self.history: list[dict] = []

    async def turn(self, text: str, printer: _Printer) -> None:
        a = self.args
        body = {"model": a.model_name, "max_tokens": a.max_tokens, "stream": True,
                "messages": self.history + [{"role": "user", "content": text}]}
        if a.system:
            body["system"] = a.system
        if a.temperature is not None:
            body["temperature"] = a.temperature
        if a.thinking_budget is not None:
            body["thinking"] = {"type": "enabled", "budget_tokens": a.thinking_budget}
        elif a.thinking is not None:
            body["thinking"] = {"type": "adaptive"} if a.thinking else {"type": "disabled"}
        blocks: list[dict] = []
        async with self.client.stream("POST", self.url, json=body) as r:
            if r.status_code != 200:
                detail = (await r.aread()).decode(errors="replace")
                try:
                    detail = json.loads(detail)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    pass
                raise RuntimeError(f"HTTP {r.status_code}: {detail}")
            async for event, data in _sse(r):
                if event == "content_block_start":
                    blocks.append(dict(data["content_block"]))
                    if blocks[-1]["type"] == "tool_use":
                        blocks[-1]["_json"] = ""
                elif event == "content_block_delta":
                    block, delta = blocks[data["index"]], data["delta"]
                    if delta["type"] == "text_delta":
                        block["text"] += delta["text"]
                        printer.write("text", delta["text"])
                    elif delta["type"] == "thinking_delta":
                        block["thinking"] += delta["thinking"]
                        printer.write("thinking", delta["thinking"])
                    elif delta["type"] == "signature_delta":
                        block["signature"] = delta["signature"]
                    elif delta["type"] == "input_json_delta":
                        block["_json"] += delta["partial_json"]
                elif event == "content_block_stop":
                    block = blocks[data["index"]]
                    if block["type"] == "tool_use":
                        block["input"] = json.loads(block.pop("_json") or "{}")
                        printer.write("text", f"[tool call {block['name']} {json.dumps(block['input'])}]")
                elif event == "error":
                    raise RuntimeError(data["error"]["message"])
        printer.end()
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": blocks or ""}]

    async def close(self) -> None:
        await self.client.aclose()


class LocalChat:
    """A conversation with the engine running in this process."""

    def __init__(self, args):
        from ..engine import AsyncLLM

        self.args = args
        path = resolve_model(args.model)
        self.engine = AsyncLLM(path, **engine_args(args, path))
        if self.engine.tokenizer is None:
            raise ValueError("this checkpoint ships no tokenizer (tiktoken.model); chat needs one")
        self.history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
        self.turns = 0

    async def turn(self, text: str, printer: _Printer) -> None:
        from ..engine import SamplingParams
        from ..server.generation import fit_max_tokens, render_prompt

        a = self.args
        messages = self.history + [{"role": "user", "content": text}]
        kwargs = {} if a.thinking is None else {"thinking": a.thinking}
        if a.thinking_budget is not None:
            kwargs["thinking"] = True
        prompt = render_prompt(self.engine.tokenizer, messages, None, kwargs)
        max_tokens, _ = fit_max_tokens(len(prompt.token_ids), a.max_tokens, self.engine.max_model_len, "anthropic")
        params = SamplingParams(max_tokens=max_tokens, temperature=1.0 if a.temperature is None else a.temperature,
                                thinking_token_budget=a.thinking_budget)
        parser = prompt.parser()
        self.turns += 1
        events = []
        async for out in self.engine.generate(prompt.token_ids, params, f"chat-{self.turns}"):
            events = parser.feed(out.new_text)
            self._show(events, printer)
        self._show(parser.finish(), printer)
        printer.end()
        result = parser.result()
        reply = {"role": "assistant", "content": result.content}
        if result.reasoning:
            reply["reasoning_content"] = result.reasoning
        self.history = messages + [reply]

    @staticmethod
    def _show(events, printer: _Printer) -> None:
        from ..chat import ContentDelta, ReasoningDelta, ToolCallStart

        for ev in events:
            if isinstance(ev, ReasoningDelta):
                printer.write("thinking", ev.text)
            elif isinstance(ev, ContentDelta):
                printer.write("text", ev.text)
            elif isinstance(ev, ToolCallStart):
                printer.write("text", f"[tool call {ev.name}]")

    async def close(self) -> None:
        self.engine.shutdown()


async def _main(args) -> int:
    chat = RemoteChat(args) if args.url else LocalChat(args)
    printer = _Printer(sys.stdout)
    interactive = args.prompt is None
    pending = list(args.prompt or [])
    status = 0
    try:
        while True:
            if interactive:
                try:
                    text = await asyncio.to_thread(input, "> " if sys.stdin.isatty() else "")
                except EOFError:
                    break
            elif pending:
                text = pending.pop(0)
            else:
                break
            text = text.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                chat.history = [m for m in chat.history if m.get("role") == "system"]
                print("(conversation cleared)")
                continue
            try:
                await chat.turn(text, printer)
            except Exception as e:  # noqa: BLE001 - a failed turn is reported; the chat goes on
                printer.end()
                print(f"moonlet chat: error: {e}", file=sys.stderr)
                status = 1
                if not interactive:
                    break
    finally:
        await chat.close()
    return status


def run(args) -> int:
    if args.thinking_budget is not None:
        if args.thinking is False:
            print("moonlet chat: error: --thinking-budget turns thinking on; drop --no-thinking", file=sys.stderr)
            return 2
        if args.thinking_budget < 0:
            print(f"moonlet chat: error: --thinking-budget must be >= 0; got {args.thinking_budget}", file=sys.stderr)
            return 2
    return asyncio.run(_main(args))
