"""Synthetic K2-format conversations for moonlet-tiny: plain answers and tool use.

Two tools (OpenAI function form, as the chat template declares them): ``calculator`` (argument
``expression``: integer arithmetic with + - * and parentheses) and ``read_file`` (argument
``path``). Task kinds:
    calc        user asks for an expression -> calculator -> final answer with the value
    read        user asks about a file -> read_file -> final answer quoting the content
    read_calc   the file holds an expression -> read_file -> calculator -> value
    calc_chain  compute A, then combine the result with k -> calculator twice -> value
    chat        plain answers without tools (greetings, identity, capitals, repeat-after-me)
    repeat      the user gives a list of numbers, words, paths or expressions to repeat verbatim
                (dense copying practice: every answer token is copied from the prompt)
Every task is deterministic in its seed. Tasks whose key hashes into the held-out bucket are
never generated for training and are the only ones generated for evaluation, so the evaluation
set is disjoint from the training set by construction.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field

TOOLS = [
    {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate integer arithmetic with + - * and parentheses.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]}}},
    {"type": "function", "function": {
        "name": "read_file", "description": "Read a text file.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}},
]
SYSTEM_PROMPTS = [None, "You are moonlet-tiny, a small assistant that uses tools.", "You are a helpful assistant."]


def agent_profile() -> dict:
    """What a model trained on these tasks knows, as `moonlet agent` reads it from a checkpoint's
    agent_profile.json: the tool declarations (Anthropic shape), a trained system prompt and the
    sampling it is evaluated with (greedy, as `moonlet eval-tools`)."""
    tools = [{"name": t["function"]["name"], "description": t["function"]["description"],
              "input_schema": t["function"]["parameters"]} for t in TOOLS]
    return {"tools": tools, "system_prompt": next(p for p in SYSTEM_PROMPTS if p), "temperature": 0.0}


HELDOUT_BUCKETS = 10  # 1 in 10 task keys is held out for evaluation

_DIRS = ["notes", "data", "docs", "src", "logs", "tmp", "home/me", "project", "reports", "config"]
_NAMES = ["todo", "plan", "readme", "ideas", "config", "list", "summary", "draft", "log", "memo", "expr", "input",
          "result", "task", "notes", "today", "build", "report", "info", "status"]
_EXTS = [".txt", ".md", ".cfg", ".log", ".py"]
_ITEMS = ["milk", "bread", "eggs", "apples", "coffee", "rice", "tea", "cheese", "paper", "batteries", "soap", "pens"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_NAMES_P = ["Ada", "Alan", "Grace", "Linus", "Ken", "Barbara", "Edsger", "Donald", "Margaret", "Guido"]
_WORDS = ["red", "blue", "green", "fast", "slow", "quiet", "bright", "small", "large", "happy", "cold", "warm"]
_CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
             "Canada": "Ottawa", "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo",
             "China": "Beijing", "India": "New Delhi", "Brazil": "Brasilia", "Greece": "Athens", "Chile": "Santiago"}


@dataclass
class Task:
    """One conversation: what the user asks, the files the read_file tool can see, the tool calls
    a correct assistant makes (name, arguments) in order, and the value the final answer must state."""
    kind: str
    system: str | None
    user: str
    tools: list | None
    calls: list[tuple[str, dict]] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    answer: str = ""  # the final assistant message
    expect: str = ""  # the substring the final answer must contain

    def key(self) -> str:
        # quotes are left out so a task and its quoted-path twin share one key (and one split)
        return json.dumps([self.kind, self.user.replace('"', ""), self.files], sort_keys=True)


# ---- the tools, executed -------------------------------------------------------------------------
_TOKEN = re.compile(r"\s*(\d+|[-+*()])")


def evaluate_expression(expr: str) -> int:
    """Integer arithmetic with + - * (unary minus too) and parentheses; ValueError on anything else."""
    pos, toks = 0, []
    expr = expr.rstrip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m:
            raise ValueError(f"calculator: unexpected character {expr[pos:pos + 1]!r} at {pos} in {expr!r}")
        toks.append(m.group(1))
        pos = m.end()
    toks.append("")
    i = 0

    def peek():
        return toks[i]

    def take():
        nonlocal i
        i += 1
        return toks[i - 1]

    def atom() -> int:
        t = take()
        if t == "-":
            return -atom()
        if t == "(":
            v = add()
            if take() != ")":
                raise ValueError(f"calculator: missing ')' in {expr!r}")
            return v
        if t.isdigit():
            return int(t)
        raise ValueError(f"calculator: expected a number in {expr!r}")

    def mul() -> int:
        v = atom()
        while peek() == "*":
            take()
            v *= atom()
        return v

    def add() -> int:
        v = mul()
        while peek() in ("+", "-"):
            v = v + mul() if take() == "+" else v - mul()
        return v

    value = add()
    if peek() != "":
        raise ValueError(f"calculator: unexpected {peek()!r} in {expr!r}")
    return value


def run_tool(task: Task, name: str, arguments: dict) -> str:
    """What the tool returns for this task's world (errors come back as text, like a real tool)."""
    try:
        if name == "calculator":
            return str(evaluate_expression(str(arguments["expression"])))
        if name == "read_file":
            path = str(arguments["path"])
            return task.files[path] if path in task.files else f"error: no such file: {path}"
    except (KeyError, ValueError) as e:
        return f"error: {e}"
    return f"error: unknown tool {name}"


# ---- task generation ------------------------------------------------------------------------------
class TaskRandom(random.Random):
    """The task generator's random source, carrying the knobs that change what is drawn."""

    wide_operands: float = 0.0


def _wide_expr(rng: random.Random, ops: int) -> str:
    """Up to two operators over operands of 1 to 4 digits (1..9999), no parentheses."""
    terms = [str(rng.randint(1, 9999))]
    for _ in range(min(ops, 2)):
        terms += [rng.choice(["+", "-", "*"]), str(rng.randint(1, 9999))]
    return " ".join(terms)


def _expr(rng: random.Random, ops: int) -> str:
    """A random expression with ``ops`` operators, small operands, sometimes parenthesized; with
    probability ``rng.wide_operands`` (a :class:`TaskRandom` knob, 0 by default) it is a wide one
    instead (:func:`_wide_expr`). With the knob at 0 no extra number is drawn, so the tasks of a
    given seed stay exactly what they were before the knob existed."""
    wide = getattr(rng, "wide_operands", 0.0)
    if wide and rng.random() < wide:
        return _wide_expr(rng, ops)
    terms = [str(rng.randint(1, 99 if ops < 3 else 30))]
    for _ in range(ops):
        op = rng.choice(["+", "-", "*"])
        operand = str(rng.randint(1, 12 if op == "*" else 99))
        if rng.random() < 0.3 and len(terms) > 1:
            terms = [f"({' '.join(terms)})"]
        terms += [op, operand]
    return " ".join(terms)


def _path(rng: random.Random) -> str:
    return f"{rng.choice(_DIRS)}/{rng.choice(_NAMES)}{rng.choice(_EXTS)}"


def _content(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        return f"Buy {rng.choice(_ITEMS)} and {rng.choice(_ITEMS)}."
    if kind == 1:
        return f"Meeting with {rng.choice(_NAMES_P)} on {rng.choice(_DAYS)} at {rng.randint(1, 12)} pm."
    if kind == 2:
        return f"port = {rng.randint(1000, 9999)}"
    if kind == 3:
        return f"The {rng.choice(_WORDS)} {rng.choice(_ITEMS)} costs {rng.randint(2, 99)} dollars."
    return f"{rng.choice(_NAMES_P)} likes {rng.choice(_WORDS)} {rng.choice(_ITEMS)}."


def _calc(rng: random.Random) -> Task:
    e = _expr(rng, rng.randint(1, 3))
    q = rng.choice(["What is {e}?", "Calculate {e}.", "Compute {e}", "How much is {e}?", "Please evaluate {e}.",
                    "Use the calculator: {e}", "what's {e}"]).format(e=e)
    r = str(evaluate_expression(e))
    a = rng.choice(["{e} = {r}.", "The answer is {r}.", "It is {r}."]).format(e=e, r=r)
    return Task("calc", None, q, TOOLS, [("calculator", {"expression": e})], {}, a, r)


def _read(rng: random.Random) -> Task:
    p, c = _path(rng), _content(rng)
    q = rng.choice(["What's in {p}?", "Read {p} for me.", "Show me the contents of {p}.",
                    "Open {p} and tell me what it says.", "What does the file {p} say?"]).format(p=p)
    a = rng.choice(["The file {p} says: {c}", "{p} contains: {c}", "It says: {c}"]).format(p=p, c=c)
    return Task("read", None, q, TOOLS, [("read_file", {"path": p})], {p: c}, a, c)


def _read_calc(rng: random.Random) -> Task:
    p, e = _path(rng), _expr(rng, rng.randint(1, 2))
    r = str(evaluate_expression(e))
    q = rng.choice(["Evaluate the expression in {p}.", "Read {p} and compute the expression in it.",
                    "{p} holds a sum; what is its value?", "Compute what is written in {p}."]).format(p=p)
    a = rng.choice(["The expression {e} equals {r}.", "{p} has {e}, which is {r}.", "The value is {r}."]).format(
        p=p, e=e, r=r)
    return Task("read_calc", None, q, TOOLS, [("read_file", {"path": p}), ("calculator", {"expression": e})],
                {p: e}, a, r)


def _calc_chain(rng: random.Random) -> Task:
    e = _expr(rng, rng.randint(1, 2))
    r1 = evaluate_expression(e)
    op, word = rng.choice([("*", "multiply the result by"), ("+", "add"), ("-", "subtract")])
    k = rng.randint(2, 9) if op == "*" else rng.randint(1, 99)
    if op == "*":
        q = f"Compute {e}, then {word} {k}."
    elif op == "+":
        q = f"Compute {e}, then add {k} to the result."
    else:
        q = f"Compute {e}, then subtract {k} from the result."
    e2 = f"{r1} {op} {k}"
    r2 = str(evaluate_expression(e2))
    a = rng.choice(["The final result is {r}.", "First {r1}, then {r}.", "The answer is {r}."]).format(r=r2, r1=r1)
    return Task("calc_chain", None, q, TOOLS, [("calculator", {"expression": e}), ("calculator", {"expression": e2})],
                {}, a, r2)


def _chat(rng: random.Random) -> Task:
    tools = TOOLS if rng.random() < 0.5 else None
    kind = rng.randrange(6)
    if kind == 0:
        q, a = rng.choice(["Hello!", "Hi", "Hey there", "Good morning"]), "Hello! How can I help you today?"
    elif kind == 1:
        q = rng.choice(["Who are you?", "What are you?", "Introduce yourself."])
        a = "I am moonlet-tiny, a small demonstration model of the Kimi K2 architecture."
    elif kind == 2:
        q = rng.choice(["What tools do you have?", "What can you do?"])
        a = ("I can use a calculator for integer arithmetic and read_file to read files." if tools else
             "I can answer simple questions. No tools are available right now.")
    elif kind == 3:
        country = rng.choice(sorted(_CAPITALS))
        q, a = f"What is the capital of {country}?", f"The capital of {country} is {_CAPITALS[country]}."
    elif kind == 4:
        words = " ".join(rng.choice(_WORDS + _ITEMS) for _ in range(rng.randint(2, 5)))
        q, a = f"Repeat after me: {words}", words
    else:
        q, a = rng.choice(["Thanks!", "Thank you.", "Great, thanks"]), "You're welcome!"
    return Task("chat", None, q, tools, [], {}, a, a)


def _repeat(rng: random.Random) -> Task:
    def item() -> str:
        kind = rng.randrange(4)
        if kind == 0:
            return str(rng.randint(0, 999))
        if kind == 1:
            return rng.choice(_WORDS + _ITEMS + _NAMES_P + _DAYS)
        if kind == 2:
            return _path(rng)
        return _expr(rng, rng.randint(1, 2))

    text = " ".join(item() for _ in range(rng.randint(3, 10)))
    q = rng.choice(["Repeat after me: {x}", "Say exactly this: {x}", "Echo: {x}", "Copy this text: {x}"]).format(x=text)
    return Task("repeat", None, q, TOOLS if rng.random() < 0.5 else None, [], {}, text, text)


GENERATORS = {"calc": _calc, "read": _read, "read_calc": _read_calc, "calc_chain": _calc_chain, "chat": _chat,
              "repeat": _repeat}
TRAIN_MIX = {"calc": 0.3, "read": 0.2, "read_calc": 0.2, "calc_chain": 0.2, "chat": 0.1}
# the second (task) phase of the tiny recipe adds dense copying practice
TASK_MIX = {"calc": 0.22, "read": 0.16, "read_calc": 0.16, "calc_chain": 0.16, "repeat": 0.22, "chat": 0.08}
EVAL_MIX = {"calc": 0.4, "read": 0.3, "read_calc": 0.15, "calc_chain": 0.15}


def is_heldout(task: Task) -> bool:
    digest = hashlib.sha256(task.key().encode()).digest()
    return digest[0] % HELDOUT_BUCKETS == 0


def generate_tasks(n: int, seed: int, heldout: bool = False, mix: dict[str, float] | None = None,
                   quote_paths: bool = False, wide_operands: float = 0.0) -> list[Task]:
    """``n`` tasks from ``mix`` (kind -> weight). ``heldout=True`` gives evaluation tasks, which no
    training call (``heldout=False``) ever produces. Chat tasks are never held out.

    ``quote_paths`` writes file paths in user requests in double quotes (``What's in "notes/a.txt"?``):
    the pre-tokenizer then cuts the path into the same tokens as in the tool call's JSON arguments,
    which makes copying it much easier for a small model. The tasks are otherwise the same.

    ``wide_operands`` (0..1) is the fraction of arithmetic expressions drawn with operands of up to
    four digits (``1234 * 5678``) instead of the usual one or two."""
    if not 0.0 <= wide_operands <= 1.0:
        raise ValueError(f"wide_operands must be between 0 and 1; got {wide_operands!r}")
    mix = mix or (EVAL_MIX if heldout else TRAIN_MIX)
    rng = TaskRandom(seed)
    rng.wide_operands = wide_operands
    kinds, weights = zip(*sorted(mix.items()))
    out = []
    while len(out) < n:
        kind = rng.choices(kinds, weights)[0]
        task = GENERATORS[kind](rng)
        if kind != "chat" and is_heldout(task) != heldout:
            continue
        if heldout and kind == "chat":
            continue
        if rng.random() < 0.5:
            task.system = rng.choice(SYSTEM_PROMPTS[1:])
        if quote_paths and task.calls and task.calls[0][0] == "read_file":
            path = task.calls[0][1]["path"]
            task.user = task.user.replace(path, f'"{path}"', 1)
        out.append(task)
    return out


# ---- conversations ------------------------------------------------------------------------------
def tool_call_id(name: str, index: int) -> str:
    return f"functions.{name}:{index}"


def prompt_messages(task: Task) -> list[dict]:
    msgs = [{"role": "system", "content": task.system}] if task.system else []
    return msgs + [{"role": "user", "content": task.user}]


def conversation(task: Task) -> list[dict]:
    """The full conversation a correct assistant has: one tool call per round, then the answer."""
    msgs = prompt_messages(task)
    for i, (name, args) in enumerate(task.calls):
        cid = tool_call_id(name, i)
        msgs.append({"role": "assistant", "content": "", "tool_calls": [
            {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]})
        msgs.append({"role": "tool", "tool_call_id": cid, "name": name, "content": run_tool(task, name, args)})
    msgs.append({"role": "assistant", "content": task.answer})
    return msgs


def encode_conversation(tokenizer, messages: list[dict], tools: list | None) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1 on assistant-turn tokens, through their end-of-turn token).

    Renders with the tokenizer's chat template; each assistant turn's text is what the full rendering
    adds after the generation prompt of the conversation before it. The text is encoded piecewise at
    the turn boundaries, which sit at special tokens, so the ids equal those of the whole text."""
    full = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=False, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tools=tools, add_generation_prompt=True, tokenize=False)
        through = tokenizer.apply_chat_template(messages[:i + 1], tools=tools, add_generation_prompt=False,
                                                tokenize=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ValueError("the chat template renders earlier turns differently as the conversation grows; "
                             "cannot locate assistant turns for the loss mask")
        spans.append((len(before), len(through)))
    return encode_spans(tokenizer, full, spans)


def encode_spans(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Ids of ``text`` encoded piecewise at the (start, end) character spans, in order and disjoint,
    and a mask of 1 inside them. Spans bounded by special tokens leave the ids those of the whole text."""
    ids: list[int] = []
    mask: list[int] = []
    pos = 0
    for a, b in spans + [(len(text), len(text))]:
        for piece, target in ((text[pos:a], 0), (text[a:b], 1)):
            if piece:
                part = tokenizer.encode(piece, allow_special=True)
                ids += part
                mask += [target] * len(part)
        pos = b
    return ids, mask
