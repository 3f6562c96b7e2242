"""Shell commands in the work directory: foreground with a timeout, or in the background as jobs whose
output is read later. Output beyond a size cap is cut in the middle with a note. With the agent's
sandbox on (``moonlet.agent.sandbox``), each command runs under Landlock: writes confined to the work
directory, the temp directory and allowed paths, TCP denied unless allowed; a failure that looks like a
denial gets a note naming the policy, so the model can ask the user. Without it, the approval policy
is what guards the shell."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time

from ..sandbox import SandboxConfig, SandboxPolicy, denial_note, resolve_policy
from .base import Tool, ToolContext, ToolError, ToolResult

DEFAULT_TIMEOUT = 60
MAX_TIMEOUT = 300
MAX_OUTPUT_CHARS = 30_000


def truncate_output(text: str, limit: int = MAX_OUTPUT_CHARS) -> str:
    if len(text) <= limit:
        return text
    head, tail = limit * 2 // 3, limit // 3
    return (f"{text[:head]}\n[... output truncated: {len(text) - head - tail} characters omitted; redirect to a "
            f"file and read parts of it to see everything ...]\n{text[-tail:]}")


class OutputBuffer:
    """Keeps the first and the last MAX_OUTPUT_CHARS bytes of a stream and counts the rest, so a command
    that prints gigabytes costs bounded memory."""

    def __init__(self, keep: int = MAX_OUTPUT_CHARS):
        self.keep = keep
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0

    def add(self, chunk: bytes) -> None:
        room = self.keep - len(self.head)
        if room > 0:
            self.head.extend(chunk[:room])
            chunk = chunk[room:]
        self.tail.extend(chunk)
        if len(self.tail) > self.keep:
            self.dropped += len(self.tail) - self.keep
            del self.tail[: len(self.tail) - self.keep]

    def text(self) -> str:
        data = self.head.decode("utf-8", "replace")
        if self.dropped:
            data += f"\n[... {self.dropped} bytes omitted ...]\n"
        return truncate_output(data + self.tail.decode("utf-8", "replace"))


async def _pump(stream, buf: OutputBuffer) -> None:
    while chunk := await stream.read(65536):
        buf.add(chunk)


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class _Job:
    def __init__(self, job_id: str, command: str, proc: asyncio.subprocess.Process,
                 policy: SandboxPolicy | None = None):
        self.id, self.command, self.proc, self.policy = job_id, command, proc, policy
        self.output = OutputBuffer()
        self.started = time.monotonic()
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        await _pump(self.proc.stdout, self.output)
        await self.proc.wait()


async def _spawn(command: str, cwd: str, policy: SandboxPolicy | None = None) -> asyncio.subprocess.Process:
    # its own process group, so a timeout kills the command's children too; sandboxed, the wrapper
    # restricts itself and execs /bin/sh -c (the same shell create_subprocess_shell runs), keeping the pid
    pipes = dict(cwd=cwd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                 stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    if policy is not None:
        return await asyncio.create_subprocess_exec(*policy.argv(command), **pipes)
    return await asyncio.create_subprocess_shell(command, **pipes)


def _with_denial_note(text: str, policy: SandboxPolicy | None, code: int | None) -> str:
    note = denial_note(policy, text, code) if policy is not None else None
    return f"{text}\n{note}" if note else text


class ShellTool(Tool):
    name = "shell"
    description = ("Run a shell command (bash) in the work directory and return its combined stdout and stderr "
                   f"with the exit code. Foreground commands time out after `timeout` seconds (default "
                   f"{DEFAULT_TIMEOUT}, at most {MAX_TIMEOUT}). For servers or long builds set `background: true` "
                   "and read the output later with job_output.")
    input_schema = {
        "type": "object",
        "properties": {
            "command": {"type": "string", "description": "the command line"},
            "timeout": {"type": "integer", "minimum": 1, "maximum": MAX_TIMEOUT},
            "background": {"type": "boolean", "description": "start as a background job and return its id"},
        },
        "required": ["command"],
    }

    def __init__(self, sandbox: SandboxConfig | None = None):
        """``sandbox``: this tool's own sandbox setting; None (the default) follows the agent's
        ``AgentConfig.sandbox`` (no sandbox when the tool runs without an agent)."""
        self.jobs: dict[str, _Job] = {}
        self._ids = itertools.count(1)
        self.sandbox = sandbox

    def sandbox_config(self, agent) -> SandboxConfig | None:
        if self.sandbox is not None:
            return self.sandbox
        return getattr(getattr(agent, "config", None), "sandbox", None)

    def policy(self, workdir, agent=None) -> SandboxPolicy | None:
        """The sandbox commands run under in ``workdir`` (None: not sandboxed)."""
        return resolve_policy(self.sandbox_config(agent), workdir)

    def confined(self, agent=None) -> bool:
        if agent is None:
            return False
        try:
            policy = self.policy(agent.workspace.root, agent)
        except ValueError:
            return False  # (run() reports why the sandbox cannot be set up)
        return policy is not None and policy.confined

    async def run(self, args: dict, ctx: ToolContext) -> ToolResult:
        command = args["command"]
        if not command.strip():
            raise ToolError("command is empty")
        try:
            policy = self.policy(ctx.workspace.root, ctx.agent)
        except ValueError as e:  # `on` without Landlock, a missing allowed path
            raise ToolError(f"the shell sandbox cannot be set up, so the command did not run: {e}")
        proc = await _spawn(command, str(ctx.workspace.root), policy)
        if args.get("background"):
            job = _Job(f"job{next(self._ids)}", command, proc, policy)
            self.jobs[job.id] = job
            return ToolResult(f"started background job {job.id} (pid {proc.pid}); use job_output with job_id "
                              f"{job.id!r} to read its output or stop it")
        timeout = args.get("timeout") or DEFAULT_TIMEOUT
        buf = OutputBuffer()
        try:
            await asyncio.wait_for(asyncio.gather(_pump(proc.stdout, buf), proc.wait()), timeout)
        except asyncio.TimeoutError:
            _kill_group(proc)
            await proc.wait()
            return ToolResult(f"{buf.text()}\n[command timed out after {timeout}s and was killed; use a larger "
                              f"timeout (max {MAX_TIMEOUT}) or background: true]", is_error=True)
        except asyncio.CancelledError:
            _kill_group(proc)
            raise
        text = buf.text()
        code = proc.returncode
        text = f"{text}{'' if text.endswith(chr(10)) or not text else chr(10)}[exit code {code}]"
        return ToolResult(_with_denial_note(text, policy, code), is_error=code != 0)

    async def close(self) -> None:
        for job in self.jobs.values():
            if job.proc.returncode is None:
                _kill_group(job.proc)
            job.reader.cancel()


class JobOutputTool(Tool):
    name = "job_output"
    description = ("Read the output so far of a background shell job (and whether it has exited); with "
                   "`kill: true` stop it first. `wait` seconds (default 0) waits for it to finish.")
    input_schema = {
        "type": "object",
        "properties": {
            "job_id": {"type": "string"},
            "kill": {"type": "boolean"},
            "wait": {"type": "number", "minimum": 0, "maximum": MAX_TIMEOUT},
        },
        "required": ["job_id"],
    }
    read_only = False

    def __init__(self, shell: ShellTool):
        self.shell = shell

    def confined(self, agent=None) -> bool:
        return self.shell.confined(agent)  # it reads and stops the shell's own jobs

    async def run(self, args: dict, ctx: ToolContext) -> ToolResult:
        job = self.shell.jobs.get(args["job_id"])
        if job is None:
            raise ToolError(f"no job {args['job_id']!r}; jobs: {', '.join(self.shell.jobs) or 'none'}")
        if args.get("kill") and job.proc.returncode is None:
            _kill_group(job.proc)
        if args.get("wait") or args.get("kill"):
            try:
                await asyncio.wait_for(asyncio.shield(job.reader), args.get("wait") or 5)
            except asyncio.TimeoutError:
                pass
        text = job.output.text()
        code = job.proc.returncode
        status = "running" if code is None else f"exited with code {code}"
        return ToolResult(_with_denial_note(f"[job {job.id}: {job.command!r} — {status}, "
                                            f"{time.monotonic() - job.started:.0f}s]\n{text}", job.policy, code))
