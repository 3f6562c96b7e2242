"""Permission rules: which tool calls run without asking, which always ask and which are refused,
as ``allow`` / ``ask`` / ``deny`` lists of rules (Claude Code's ``permissions`` settings, with
moonlet's tool names).

Sources, all merged (every rule of every source applies): ``.moonlet/settings.json`` and
``.moonlet/settings.local.json`` in the work directory, ``$MOONLET_HOME/settings.json`` (home
default ``~/.moonlet``), and the run's ``--allowed-tools`` / ``--disallowed-tools``. Each file is
``{"permissions": {"allow": [...], "ask": [...], "deny": [...]}}``.

Rules: a bare tool name (``read_file``, ``task``, ``mcp__server__tool``, or ``mcp__server`` for every
tool of a server) matches every call of it; ``read_file(GLOB)``, ``write_file(GLOB)`` and
``str_replace(GLOB)`` match the call's path with a gitignore-style glob (see ``PathPattern``);
``shell(PREFIX:*)`` matches a command whose words start with PREFIX's words, ``shell(COMMAND)`` one
that is exactly COMMAND (see ``split_shell`` for compound commands); ``web_fetch(domain:HOST)``
matches URLs on HOST (``*.HOST`` for its subdomains).

Precedence (``evaluate``): deny > ask > allow > the approval mode. A shell command made of several
simple commands is denied when any part matches a deny rule, asks when any part matches an ask rule,
and is allowed only when every part matches an allow rule (and every file it redirects output to is
allowed for ``write_file``)."""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass, field
from urllib.parse import urlsplit

KINDS = ("deny", "ask", "allow")   # in precedence order
PATH_TOOLS = ("read_file", "write_file", "str_replace")
KNOWN_TOOLS = ("shell", "job_output", "read_file", "write_file", "str_replace", "glob", "grep", "web_fetch",
               "task", "swarm", "set_todo_list", "pin_note", "calculator")
CLAUDE_NAMES = {"Bash": "shell", "Read": "read_file", "Write": "write_file", "Edit": "str_replace",
                "MultiEdit": "str_replace", "Glob": "glob", "Grep": "grep", "WebFetch": "web_fetch", "Task": "task"}
_RULE = re.compile(r"^([A-Za-z0-9_-]+)(?:\((.*)\))?$", re.S)


class PermissionRuleError(ValueError):
    """A settings file or a rule that cannot be used; the message names the source and the rule."""


def moonlet_home() -> str:
    return os.environ.get("MOONLET_HOME") or os.path.join(os.path.expanduser("~"), ".moonlet")


def settings_files(workdir: str) -> list[str]:
    """The settings files read for a work directory, in the order their rules are listed."""
    return [os.path.join(workdir, ".moonlet", "settings.json"),
            os.path.join(workdir, ".moonlet", "settings.local.json"),
            os.path.join(moonlet_home(), "settings.json")]


# -- path globs --------------------------------------------------------------------------------------
def _glob_regex(pattern: str) -> str:
    """A regex for a glob over '/'-separated paths: ``**`` any number of directories (zero included),
    ``*`` and ``?`` within one name, ``[...]`` a character class."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**", i):
            before_ok = i == 0 or pattern[i - 1] == "/"
            after = pattern[i + 2:i + 3]
            if before_ok and after == "/":
                out.append("(?:.*/)?")
                i += 3
                continue
            if before_ok and after == "":
                out.append(".*")
                i += 2
                continue
            out.append("[^/]*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = pattern.find("]", i + 2 if pattern[i + 1:i + 2] in ("!", "]") else i + 1)
            if j < 0:
                out.append(re.escape(c))
                i += 1
                continue
            body = pattern[i + 1:j]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


@dataclass
class PathPattern:
    """A gitignore-style path glob. ``//abs/**`` is the absolute path ``/abs/**``; ``~/x`` is under the
    home directory; anything else is relative to the work directory: with a ``/`` in it (``src/*.py``,
    or a leading ``/``) it is anchored at the work directory, without one (``*.env``) it matches a name
    at any depth. A trailing ``/`` (``build/``) means everything under that directory; a pattern also
    matches everything under a directory it matches (``src`` covers ``src/a.py``)."""
    text: str
    regex: re.Pattern = field(init=False)
    absolute: bool = field(init=False)

    def __post_init__(self):
        p = self.text
        if not p:
            raise ValueError("an empty path pattern")
        if p.startswith("//"):
            self.absolute, body = True, p[1:]
        elif p == "~" or p.startswith("~/"):
            self.absolute, body = True, os.path.expanduser("~") + p[1:]
        else:
            self.absolute = False
            body = p[1:] if p.startswith("/") else p
            if "/" not in p.rstrip("/"):   # a bare name: at any depth (a leading / anchors it)
                body = "**/" + body
        if body.endswith("/"):
            body += "**"
        self.regex = re.compile(_glob_regex(body) + "(?:/.*)?", re.S)

    def matches(self, real: str, workdir: str) -> bool:
        """``real`` is the absolute path a call uses; relative patterns match it only inside the work
        directory."""
        if self.absolute:
            return bool(self.regex.fullmatch(real))
        rel = os.path.relpath(real, workdir)
        if rel == ".." or rel.startswith("../"):
            return False
        return bool(self.regex.fullmatch(rel))


# -- shell commands -----------------------------------------------------------------------------------
@dataclass
class ShellParts:
    """A shell command split into its simple commands (each a list of words, quotes removed), the files
    its output is redirected to and the files its input is read from. ``unknown_targets`` is set when
    a redirection target could not be read as a plain path (it holds ``$``, a glob, a substitution)."""
    commands: list[list[str]]
    writes: list[str]
    reads: list[str]
    unknown_targets: bool = False
    # paths the commands themselves write, create or delete (``cp``/``mv`` destinations, ``rm`` operands,
    # ``sed -i`` files, ``tee``, ``dd of=``, ``find -delete`` roots...), as (command name, path)
    touches: list[tuple[str, str]] = field(default_factory=list)
    # a command whose name or file operand comes from a variable or a substitution (``$CMD``, ``rm $F``)
    dynamic: bool = False


_SEPARATORS = ("&&", "||", ";;", "|&", ";", "|", "&", "\n")
_RESERVED = {"if", "then", "else", "elif", "fi", "do", "done", "while", "until", "!", "{", "}", "case", "esac"}
_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


class _Unsplittable(Exception):
    pass


class _Scanner:
    """A small shell lexer: enough of POSIX sh to find every simple command of a command line, the
    ones inside ``$(...)``, backticks and ``<(...)``/``>(...)`` included, honouring quotes. What it does
    not handle (heredocs, ``$((...))``, unbalanced quotes or parentheses) raises ``_Unsplittable``."""

    def __init__(self, text: str):
        self.s = text
        self.segments: list[str] = []
        self.writes: list[str] = []
        self.reads: list[str] = []
        self.unknown = False

    def run(self) -> None:
        i = self.parse(0, None)
        if i != len(self.s):
            raise _Unsplittable("unbalanced ')'")

    def parse(self, i: int, end: str | None) -> int:
        """Scan from ``i`` until ``end`` (``)`` or a backtick, or the end of the text); returns the
        index just past the terminator."""
        s, cur, depth = self.s, [], 0

        def flush():
            self.segments.append("".join(cur))
            cur.clear()

        while i < len(s):
            c = s[i]
            if end == "`" and c == "`":
                flush()
                return i + 1
            if c == ")" and end == ")" and depth == 0:
                flush()
                return i + 1
            if c == "'":
                j = s.find("'", i + 1)
                if j < 0:
                    raise _Unsplittable("unbalanced quote")
                cur.append(s[i:j + 1])
                i = j + 1
            elif c == '"':
                i = self.double_quoted(i, cur)
            elif c == "\\":
                if i + 1 < len(s) and s[i + 1] == "\n":
                    i += 2   # a line continuation
                else:
                    cur.append(s[i:i + 2])
                    i += 2
            elif c == "`":
                i = self.parse(i + 1, "`")
                cur.append("__substitution__")
            elif s.startswith("$((", i):
                raise _Unsplittable("arithmetic expansion")
            elif s.startswith("$(", i):
                i = self.parse(i + 2, ")")
                cur.append("__substitution__")
            elif s.startswith(("<(", ">("), i):
                i = self.parse(i + 2, ")")
                cur.append("__substitution__")
            elif s.startswith("<<", i):
                raise _Unsplittable("heredoc")
            elif c == "#" and (not cur or cur[-1][-1:].isspace()):
                j = s.find("\n", i)
                i = len(s) if j < 0 else j
            elif c in "<>" or s.startswith("&>", i):
                i = self.redirect(i, cur)
            elif c == "(":
                flush()
                depth += 1
                i += 1
            elif c == ")":
                if depth == 0:
                    if end is None:
                        raise _Unsplittable("unbalanced ')'")
                    raise _Unsplittable("unbalanced ')'")
                flush()
                depth -= 1
                i += 1
            else:
                sep = next((p for p in _SEPARATORS if s.startswith(p, i)), None)
                if sep is not None:
                    flush()
                    i += len(sep)
                else:
                    cur.append(c)
                    i += 1
        if end is not None or depth:
            raise _Unsplittable("unclosed substitution or parenthesis")
        flush()
        return i

    def double_quoted(self, i: int, cur: list) -> int:
        s, j, out = self.s, i + 1, ['"']
        while j < len(s):
            c = s[j]
            if c == '"':
                cur.append("".join(out) + '"')
                return j + 1
            if c == "\\":
                out.append(s[j:j + 2])
                j += 2
            elif c == "`":
                j = self.parse(j + 1, "`")
                out.append("__substitution__")
            elif s.startswith("$((", j):
                raise _Unsplittable("arithmetic expansion")
            elif s.startswith("$(", j):
                j = self.parse(j + 2, ")")
                out.append("__substitution__")
            else:
                out.append(c)
                j += 1
        raise _Unsplittable("unbalanced quote")

    def redirect(self, i: int, cur: list) -> int:
        s = self.s
        if s.startswith("&>", i):
            op, i = ">", i + 2
            if s.startswith(">", i):
                i += 1
        else:
            op = s[i]
            i += 1
            if s[i:i + 1] in (">", "|") and op == ">":
                i += 1
            elif s[i:i + 1] == ">" and op == "<":   # <> opens read-write
                op = "<>"
                i += 1
            # an fd number just before the operator (2>) belongs to it, not to the command's words
            k = len(cur)
            while k and cur[k - 1].isdigit():
                k -= 1
            if k < len(cur) and (k == 0 or cur[k - 1].isspace()):
                del cur[k:]
        if s[i:i + 1] == "&":   # >&2, 2>&1, <&0: a file descriptor, not a file
            i += 1
            while i < len(s) and (s[i].isdigit() or s[i] == "-"):
                i += 1
            return i
        while i < len(s) and s[i] in " \t":
            i += 1
        start, word = i, []
        while i < len(s) and not s[i].isspace() and s[i] not in ";&|()<>":
            if s[i] in "'\"":
                q = s.find(s[i], i + 1)
                if q < 0:
                    raise _Unsplittable("unbalanced quote")
                word.append(s[i:q + 1])
                i = q + 1
            else:
                word.append(s[i])
                i += 1
        raw = "".join(word)
        if not raw:
            raise _Unsplittable(f"a redirection without a target at {start}")
        try:
            parts = shlex.split(raw)
        except ValueError as e:
            raise _Unsplittable(str(e)) from None
        target = parts[0] if len(parts) == 1 else None
        if target is None or any(ch in raw for ch in "$`*?[~"):
            self.unknown = True
        elif target not in ("/dev/null", "/dev/stdout", "/dev/stderr"):
            if ">" in op:
                self.writes.append(target)
            if "<" in op:
                self.reads.append(target)
        cur.append(" ")
        return i


def split_shell(command: str, depth: int = 0) -> ShellParts | None:
    """The simple commands of a shell command line, or None when it cannot be split with confidence.

    Separators: ``&&``, ``||``, ``;``, ``|``, ``&``, newlines and subshell parentheses; the commands
    inside ``$(...)``, backticks and process substitutions are commands of their own (the outer one
    keeps the placeholder word ``__substitution__``). Quoting hides separators (``echo "a && b"`` is one
    command). Leading reserved words (``if``, ``then``, ``do``, ``!``, ``{`` ...) are dropped from a
    command's words; variable assignments (``A=1 cmd``) are kept. Redirections are taken out of the
    words: ``>``/``>>``/``&>`` targets are listed as writes, ``<`` targets as reads (``/dev/null`` and
    ``>&2``-style descriptors are not files). Heredocs, ``$((...))`` and unbalanced quotes or
    parentheses give None.

    Commands inside commands are commands too (``_look_inside``): a shell's ``-c`` script and
    ``eval``'s words (split the same way, nested up to ``_MAX_DEPTH``), the command a wrapper runs
    (``env``, ``timeout``, ``nice``, ``nohup``, ``command``, ``exec``, ``time``, ``stdbuf``, ``sudo``,
    ``xargs``) and ``find``'s ``-exec`` commands; the files commands write or delete are ``touches``."""
    sc = _Scanner(command)
    try:
        sc.run()
    except _Unsplittable:
        return None
    commands = []
    for seg in sc.segments:
        try:
            words = shlex.split(seg, comments=False, posix=True)
        except ValueError:
            return None
        while words and words[0] in _RESERVED:
            words = words[1:]
        while words and words[-1] in ("}", "fi", "done", "esac"):
            words = words[:-1]
        if words:
            commands.append(words)
    parts = ShellParts(commands, sc.writes, sc.reads, sc.unknown)
    return _look_inside(parts, depth)


# -- commands inside commands ---------------------------------------------------------------------
_SHELLS = {"sh", "bash", "zsh", "dash", "ksh", "ash"}
_MAX_DEPTH = 4  # sh -c "bash -c '...'" nesting looked into


def _opts(words: list[str], i: int, with_arg: set[str], long_with_arg: set[str] = frozenset()) -> int:
    """The index of the first word at or after ``i`` that is not an option (``--`` ends the options);
    options in ``with_arg`` take the next word as their value (also when written joined, ``-n5``)."""
    while i < len(words):
        w = words[i]
        if w == "--":
            return i + 1
        if not w.startswith("-") or w == "-":
            return i
        if w.startswith("--"):
            i += 2 if w in long_with_arg else 1
            continue
        i += 2 if w in with_arg else 1
    return i


def _wrapped(words: list[str]) -> list[str] | None:
    """The command a wrapper runs (``env``, ``timeout``, ``nice``, ``nohup``, ``command``, ``exec``,
    ``time``, ``stdbuf``, ``sudo``, ``xargs``), or None when ``words`` is not one."""
    name = os.path.basename(words[0])
    if name == "env":
        i = 1
        while i < len(words):
            w = words[i]
            if w in ("-u", "--unset", "-C", "--chdir", "-S", "--split-string"):
                i += 2
            elif w.startswith("-") or _ASSIGN.match(w):
                i += 1
            else:
                break
        return words[i:]
    if name == "timeout":
        i = _opts(words, 1, {"-s", "-k"}, {"--signal", "--kill-after"})
        return words[i + 1:]  # after the duration
    if name == "nice":
        return words[_opts(words, 1, {"-n"}, {"--adjustment"}):]
    if name in ("nohup", "time", "command", "builtin"):
        return words[_opts(words, 1, set()):]
    if name == "exec":
        return words[_opts(words, 1, {"-a"}):]
    if name == "stdbuf":
        return words[_opts(words, 1, {"-i", "-o", "-e"}):]
    if name in ("sudo", "doas"):
        return words[_opts(words, 1, {"-u", "-g", "-h", "-p", "-C", "-U", "-r", "-t"},
                           {"--user", "--group", "--host", "--prompt"}):]
    if name == "xargs":
        return words[_opts(words, 1, {"-I", "-i", "-n", "-P", "-d", "-E", "-e", "-L", "-l", "-s", "-a"},
                           {"--max-args", "--max-procs", "--delimiter", "--arg-file", "--max-chars"}):]
    return None


def _script(words: list[str]) -> str | None:
    """A shell's ``-c`` script (``bash -c "..."``, ``sh -ec '...'``), or None."""
    if os.path.basename(words[0]) not in _SHELLS:
        return None
    for i, w in enumerate(words[1:], 1):
        if w.startswith("-") and not w.startswith("--") and "c" in w[1:]:
            return words[i + 1] if i + 1 < len(words) else ""
        if not w.startswith("-"):
            return None  # a script file or other operand: not looked into
    return None


def _find_parts(words: list[str]) -> tuple[list[list[str]], list[str], bool]:
    """``find``: the commands its ``-exec``/``-execdir``/``-ok``/``-okdir`` run, and its search roots
    when it has ``-delete``. The third value: an exec list that does not end."""
    roots = []
    i = 1
    while i < len(words) and not words[i].startswith("-") and words[i] not in ("(", "!", "\\("):
        roots.append(words[i])
        i += 1
    inner, deletes, open_exec = [], False, False
    while i < len(words):
        w = words[i]
        if w in ("-exec", "-execdir", "-ok", "-okdir"):
            j = i + 1
            while j < len(words) and words[j] not in (";", "+"):
                j += 1
            open_exec = open_exec or j >= len(words)
            if words[i + 1:j]:
                inner.append(words[i + 1:j])
            i = j + 1
            continue
        deletes = deletes or w == "-delete"
        i += 1
    return inner, (roots or ["."]) if deletes else [], open_exec


def _writes_of(words: list[str]) -> list[str]:
    """The paths a file-changing command writes, creates or deletes (its operands); [] for others."""
    name = os.path.basename(words[0])
    args = words[1:]
    plain = [a for a in args if not a.startswith("-") or a == "-"]
    if name in ("rm", "rmdir", "unlink", "shred", "touch", "mkdir", "truncate", "chmod", "chown", "chgrp"):
        if name == "truncate":
            return [a for a in words[_opts(words, 1, {"-s", "-r"}, {"--size", "--reference"}):]]
        if name in ("chmod", "chown", "chgrp"):
            return plain[1:]  # after the mode / owner
        return plain
    if name in ("cp", "mv", "install", "ln"):
        for i, a in enumerate(args):
            if a in ("-t", "--target-directory") and i + 1 < len(args):
                return [args[i + 1]]
            if a.startswith("--target-directory="):
                return [a.split("=", 1)[1]]
        return plain[-1:] if len(plain) >= 2 or name == "ln" else []
    if name == "tee":
        return plain
    if name == "dd":
        return [a[3:] for a in args if a.startswith("of=")]
    if name in ("sed", "perl"):
        in_place = any(a == "-i" or a.startswith("-i") or a.startswith("--in-place") or
                       (name == "perl" and a.startswith("-") and "i" in a[1:] and not a.startswith("--"))
                       for a in args)
        if not in_place:
            return []
        files, script_given, skip = [], False, False
        for a in args:
            if skip:
                skip = False
                continue
            if a in ("-e", "-f", "--expression", "--file"):
                script_given, skip = True, True
            elif a.startswith("-") and a != "-":
                if name == "perl" and "e" in a[1:]:
                    script_given, skip = True, True
            elif not script_given:
                script_given = True  # the first operand is the script
            else:
                files.append(a)
        return files
    return []


def _look_inside(parts: ShellParts, depth: int) -> ShellParts | None:
    """Add to ``parts`` the commands its commands run (a shell's ``-c`` script, ``eval``'s words,
    wrappers' commands, ``find -exec``) and the files they write; None when an inner script cannot be
    split with confidence or the nesting is deeper than ``_MAX_DEPTH``."""
    queue, seen = list(parts.commands), 0
    while seen < len(queue):
        words = _strip_assignments(queue[seen])
        seen += 1
        if not words:
            continue
        if "$" in words[0] or "`" in words[0] or words[0] == "__substitution__":
            parts.dynamic = True
            continue
        script = _script(words)
        if script is None and os.path.basename(words[0]) == "eval":
            script = " ".join(words[1:])
        if script is not None:
            if depth >= _MAX_DEPTH:
                return None
            inner = split_shell(script, depth + 1)
            if inner is None:
                return None
            parts.commands.extend(inner.commands)
            parts.writes.extend(inner.writes)
            parts.reads.extend(inner.reads)
            parts.touches.extend(inner.touches)
            parts.unknown_targets |= inner.unknown_targets
            parts.dynamic |= inner.dynamic
            continue
        wrapped = _wrapped(words)
        if wrapped is not None:
            if wrapped:
                parts.commands.append(wrapped)
                queue.append(wrapped)
            continue
        if os.path.basename(words[0]) == "find":
            inner, deleted, open_exec = _find_parts(words)
            if open_exec:
                return None
            for cmd in inner:
                parts.commands.append(cmd)
                queue.append(cmd)
            parts.touches.extend(("find -delete", r) for r in deleted)
            continue
        for path in _writes_of(words):
            if "$" in path or "`" in path or path == "__substitution__":
                parts.dynamic = True
            else:
                parts.touches.append((os.path.basename(words[0]), path))
    return parts


def _strip_assignments(words: list[str]) -> list[str]:
    k = 0
    while k < len(words) and _ASSIGN.match(words[k]):
        k += 1
    return words[k:]


# -- rules -----------------------------------------------------------------------------------------
@dataclass
class Rule:
    """One rule: ``kind`` (allow / ask / deny), the tool (or ``mcp__server``), the specifier in the
    parentheses (None: every call), and where it was defined."""
    kind: str
    text: str
    source: str
    tool: str = field(init=False)
    spec: str | None = field(init=False)
    path: PathPattern | None = field(init=False, default=None)
    words: list[str] | None = field(init=False, default=None)
    prefix: bool = field(init=False, default=False)
    domain: str | None = field(init=False, default=None)

    def __post_init__(self):
        def bad(why: str) -> PermissionRuleError:
            return PermissionRuleError(f"{self.source}: {self.kind} rule {self.text!r}: {why}")

        if not isinstance(self.text, str):
            raise bad("a rule must be a string")
        m = _RULE.match(self.text.strip())
        if not m:
            hint = ("; if this is the task, put it before the flag or write --allowed-tools=RULE"
                    if self.source.startswith("--") else "")
            raise bad("expected TOOL or TOOL(SPECIFIER), e.g. read_file, shell(git diff:*), write_file(src/**)" + hint)
        self.tool, self.spec = m.group(1), m.group(2)
        if self.tool in CLAUDE_NAMES:
            raise bad(f"moonlet's tool for Claude Code's {self.tool} is {CLAUDE_NAMES[self.tool]!r}")
        if not self.tool.startswith("mcp__") and self.tool not in KNOWN_TOOLS:
            raise bad(f"unknown tool {self.tool!r}; the tools are {', '.join(KNOWN_TOOLS)} and mcp__SERVER[__TOOL]")
        if self.spec is None:
            return
        spec = self.spec.strip()
        if not spec:
            raise bad("empty parentheses; leave them out to match every call of the tool")
        if self.tool in PATH_TOOLS:
            self.path = PathPattern(spec)
        elif self.tool == "shell":
            self.prefix = spec.endswith(":*")
            body = spec[:-2] if self.prefix else spec
            try:
                self.words = shlex.split(body)
            except ValueError as e:
                raise bad(f"the command cannot be split into words ({e})") from None
            if not self.words:
                raise bad("an empty command")
            if ":*" in body:
                raise bad("':*' may only end the rule (a prefix followed by anything)")
        elif self.tool == "web_fetch":
            if not spec.startswith("domain:") or not spec[7:].strip():
                raise bad("web_fetch rules take domain:HOST (e.g. web_fetch(domain:example.com))")
            self.domain = spec[7:].strip().lower()
        else:
            raise bad(f"{self.tool} takes no specifier; write it bare to match every call")

    def names_tool(self, name: str) -> bool:
        return name == self.tool or (self.tool.startswith("mcp__") and self.tool.count("__") == 1
                                     and name.startswith(self.tool + "__"))

    def matches_words(self, words: list[str]) -> bool:
        n = len(self.words)
        return words[:n] == self.words if self.prefix else words == self.words

    def matches_path(self, real: str, workdir: str) -> bool:
        return self.path is None or self.path.matches(real, workdir)

    def matches_url(self, url: str) -> bool:
        host = (urlsplit(url).hostname or "").lower()
        if self.domain.startswith("*."):
            return host.endswith(self.domain[1:])
        return host == self.domain

    def __str__(self) -> str:
        return f"{self.kind} {self.text} ({self.source})"


@dataclass
class Verdict:
    """What the rules say about a call: ``kind`` deny / ask / allow, or None (the approval mode
    decides); ``rule`` the deciding rule (None for an allow that took several rules)."""
    kind: str | None
    rule: Rule | None = None
    note: str = ""

    def describe(self) -> str:
        if self.rule is None:
            return self.note or (self.kind or "no rule")
        return f"{self.rule.kind} rule {self.rule.text!r} from {self.rule.source}"


class PermissionRules:
    """The merged rules of a run. ``evaluate(tool_name, args, workdir)`` gives the ``Verdict``."""

    def __init__(self, rules: list[Rule] | None = None):
        self.rules: list[Rule] = list(rules or [])
        self.default_modes: dict[str, str] = {}  # settings file -> its permissions.defaultMode (a moonlet mode)

    def default_mode(self, workdir: str) -> str | None:
        """The approval mode the settings files ask for (``permissions.defaultMode``): the local
        project file's, else the project's, else the user's; None when none says."""
        project, local, user = settings_files(workdir)
        for path in (local, project, user):
            if path in self.default_modes:
                return self.default_modes[path]
        return None

    def __bool__(self) -> bool:
        return bool(self.rules)

    def add(self, kind: str, texts, source: str) -> None:
        if kind not in KINDS:
            raise PermissionRuleError(f"{source}: unknown rule list {kind!r}; use allow, ask or deny")
        if isinstance(texts, str) or not isinstance(texts, list):
            raise PermissionRuleError(f"{source}: permissions.{kind} must be a list of rule strings")
        for t in texts:
            self.rules.append(Rule(kind, t, source))

    def add_settings(self, data, source: str) -> None:
        """The rules of a parsed settings object (other top-level keys are ignored)."""
        if not isinstance(data, dict):
            raise PermissionRuleError(f"{source}: expected a JSON object")
        perms = data.get("permissions")
        if perms is None:
            return
        if not isinstance(perms, dict):
            raise PermissionRuleError(f"{source}: 'permissions' must be an object with allow/ask/deny lists")
        for kind, texts in perms.items():
            if kind == "defaultMode":
                self.default_modes[source] = _default_mode(texts, source)
                continue
            if kind == "additionalDirectories":
                continue   # a Claude Code key moonlet does not use (its file tools stay in the work directory)
            self.add(kind, texts, source)

    def load_file(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise PermissionRuleError(f"{path}: not valid JSON ({e})") from None
        self.add_settings(data, path)

    def to_lists(self, source: str | None = None) -> dict:
        out: dict = {}
        for r in self.rules:
            if source is None or r.source == source:
                out.setdefault(r.kind, []).append(r.text)
        return out

    # -- evaluation ---------------------------------------------------------------------------------
    def _first(self, kind: str, pred) -> Rule | None:
        return next((r for r in self.rules if r.kind == kind and pred(r)), None)

    def evaluate(self, name: str, args: dict, workdir: str) -> Verdict:
        args = args if isinstance(args, dict) else {}
        if name == "shell":
            return self._evaluate_shell(str(args.get("command", "")), workdir)
        if name in PATH_TOOLS:
            raw = args.get("path")
            real = _real_path(raw, workdir) if isinstance(raw, str) and raw else None

            def pred(r):
                return r.names_tool(name) and (r.path is None or (real is not None and r.matches_path(real, workdir)))
        elif name == "web_fetch":
            url = str(args.get("url", ""))

            def pred(r):
                return r.names_tool(name) and (r.domain is None or r.matches_url(url))
        else:
            def pred(r):
                return r.names_tool(name)
        for kind in KINDS:
            rule = self._first(kind, pred)
            if rule is not None:
                return Verdict(kind, rule)
        return Verdict(None)

    def _evaluate_shell(self, command: str, workdir: str) -> Verdict:
        shell_rules = [r for r in self.rules if r.names_tool("shell")]
        if not shell_rules:
            return Verdict(None)
        parts = split_shell(command)
        if parts is None:
            # cannot split: a bare `shell` rule still applies (it needs no parsing); prefix rules are
            # checked against the whole text for deny/ask only, never for allow
            words = _loose_words(command)
            for kind in ("deny", "ask"):
                rule = self._first(kind, lambda r: r.names_tool("shell") and
                                   (r.words is None or _contains_words(words, r.words)))
                if rule is not None:
                    return Verdict(kind, rule)
            rule = self._first("allow", lambda r: r.names_tool("shell") and r.words is None)
            if rule is not None:
                return Verdict("allow", rule)
            return Verdict(None, note="the command could not be split into simple commands with confidence, "
                                      "so allow rules do not apply to it")
        for kind in ("deny", "ask"):
            for words in parts.commands:
                bare = _strip_assignments(words)
                rule = self._first(kind, lambda r: r.names_tool("shell") and
                                   (r.words is None or r.matches_words(words) or r.matches_words(bare)))
                if rule is not None:
                    return Verdict(kind, rule)
            for target in parts.writes:
                real = _real_path(target, workdir)
                rule = self._first(kind, lambda r: r.tool in ("write_file", "str_replace") and
                                   r.matches_path(real, workdir))
                if rule is not None:
                    return Verdict(kind, rule, note=f"output redirected to {target}")
            for target in parts.reads:
                real = _real_path(target, workdir)
                rule = self._first(kind, lambda r: r.tool == "read_file" and r.matches_path(real, workdir))
                if rule is not None:
                    return Verdict(kind, rule, note=f"input read from {target}")
            for verb, target in parts.touches:
                for real in _touched(verb, _real_path(target, workdir)):
                    rule = self._first(kind, lambda r: r.tool in ("write_file", "str_replace") and
                                       r.matches_path(real, workdir))
                    if rule is not None:
                        return Verdict(kind, rule, note=f"{verb} writes {target}")
        bare_allow = self._first("allow", lambda r: r.names_tool("shell") and r.words is None)
        if bare_allow is not None:
            return Verdict("allow", bare_allow)
        used = []
        for words in parts.commands:
            rule = self._first("allow", lambda r: r.names_tool("shell") and r.words is not None
                               and r.matches_words(words))
            if rule is None:
                return Verdict(None, note=f"no allow rule covers {shlex.join(words)!r}")
            used.append(rule)
        if parts.unknown_targets:
            return Verdict(None, note="a redirection target is not a plain path")
        if parts.dynamic:
            return Verdict(None, note="a command name or file operand comes from a variable or a substitution, "
                                      "so allow rules do not apply to it")
        inside = os.path.realpath(workdir)
        for verb, target in parts.touches:
            real = _real_path(target, workdir)
            if real != inside and not real.startswith(inside + os.sep):
                return Verdict(None, note=f"{verb} writes {target}, outside the work directory")
        for target in parts.writes:
            real = _real_path(target, workdir)
            rule = self._first("allow", lambda r: r.tool == "write_file" and r.matches_path(real, workdir))
            if rule is None:
                return Verdict(None, note=f"output is redirected to {target}, which no write_file allow rule covers")
            used.append(rule)
        if not used:
            return Verdict(None)
        return Verdict("allow", used[0] if len(used) == 1 else None,
                       note="allow rules " + ", ".join(sorted({f"{r.text!r} ({r.source})" for r in used})))


MAX_DELETE_WALK = 5000  # files under a deleted directory checked against the rules


def _touched(verb: str, real: str):
    """The paths a touch changes: the path, and for a delete (``rm``, ``rmdir``, ``find -delete``) of an
    existing directory the files under it (the first MAX_DELETE_WALK), so that ``rm -rf secrets`` meets
    a rule on ``secrets/**``."""
    yield real
    if verb not in ("rm", "rmdir", "find -delete") or not os.path.isdir(real) or os.path.islink(real):
        return
    count = 0
    for root, dirs, files in os.walk(real):
        for name in dirs + files:
            yield os.path.join(root, name)
            count += 1
            if count >= MAX_DELETE_WALK:
                return


def _real_path(raw: str, workdir: str) -> str:
    p = os.path.expanduser(raw)
    if not os.path.isabs(p):
        p = os.path.join(workdir, p)
    return os.path.realpath(p)


def _loose_words(command: str) -> list[str]:
    return re.findall(r"[^\s;&|()<>`$\"']+", command)


def _contains_words(words: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return any(words[i:i + n] == needle for i in range(len(words) - n + 1))


def remember_rules(name: str, args: dict) -> list[str]:
    """The allow rules an "always" answer adds for a call: for ``shell`` one ``shell(PREFIX:*)`` per
    simple command, PREFIX being its first word and, when the second word is not an option or a
    path, the second too (``npm test``, ``git diff``); empty when the command cannot be split (the
    answer then approves this call only). Other tools: the bare tool name."""
    if name != "shell":
        return [name]
    parts = split_shell(str((args or {}).get("command", "")))
    if parts is None or not parts.commands or parts.writes or parts.unknown_targets:
        return []
    rules = []
    for words in parts.commands:
        if _ASSIGN.match(words[0]) or words[0] == "__substitution__":
            return []
        keep = words[:2] if len(words) > 1 and re.fullmatch(r"[A-Za-z][\w.:-]*", words[1]) else words[:1]
        rule = f"shell({shlex.join(keep)}:*)"
        if rule not in rules:
            rules.append(rule)
    return rules


# Claude Code's permission modes, as moonlet's approval modes
_CLAUDE_MODES = {"default": "reads", "acceptEdits": "edits", "bypassPermissions": "yolo", "plan": "plan"}


def _default_mode(value, source: str) -> str:
    from .approval import MODES

    if value in MODES:
        return value
    if value in _CLAUDE_MODES:
        return _CLAUDE_MODES[value]
    raise PermissionRuleError(f"{source}: permissions.defaultMode {value!r} is not an approval mode; use one of "
                              f"{', '.join(MODES)} (or Claude Code's {', '.join(_CLAUDE_MODES)})")


def load_rules(workdir: str, cli: dict | None = None) -> PermissionRules:
    """The merged rules for a run in ``workdir``: the settings files that exist (``settings_files``),
    then the command line's (``cli``: {"allow": [...], "deny": [...]}). A bad file or rule raises
    ``PermissionRuleError`` naming it."""
    rules = PermissionRules()
    for path in settings_files(workdir):
        if os.path.isfile(path):
            rules.load_file(path)
    for kind, texts in (cli or {}).items():
        if texts:
            flag = {"allow": "--allowed-tools", "deny": "--disallowed-tools"}.get(kind, kind)
            rules.add(kind, list(texts), flag)
    return rules


def persist_rules(workdir: str, texts: list[str]) -> str:
    """Add allow rules to ``.moonlet/settings.local.json`` in the work directory (created if needed,
    other keys kept); returns its path."""
    path = os.path.join(workdir, ".moonlet", "settings.local.json")
    data: dict = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    allow = data.setdefault("permissions", {}).setdefault("allow", [])
    for t in texts:
        if t not in allow:
            allow.append(t)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


def split_rule_args(values) -> list[str]:
    """Flatten --allowed-tools / --disallowed-tools values: each may hold several rules separated by
    commas or spaces outside parentheses (``"read_file,shell(git diff:*)"``)."""
    out: list[str] = []
    for v in values or []:
        for item in (v if isinstance(v, list) else [v]):
            depth, cur = 0, []
            for ch in item:
                if ch == "(":
                    depth += 1
                elif ch == ")":
                    depth = max(0, depth - 1)
                if depth == 0 and (ch == "," or ch.isspace()):
                    if "".join(cur).strip():
                        out.append("".join(cur).strip())
                    cur = []
                else:
                    cur.append(ch)
            if "".join(cur).strip():
                out.append("".join(cur).strip())
    return out
