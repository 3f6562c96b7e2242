"""What the shell sandbox costs per command: the agent's shell tool running the same command with
the sandbox off and on (the Landlock wrapper: a ``python -I -S`` start, the ruleset, then ``exec``).

    python bench/agent_sandbox.py                     # 50 calls of `true` and of a small pipeline, each way
    python bench/agent_sandbox.py --calls 200 --command "ls -R /usr/lib/python3* | wc -l"

Calls alternate between the two settings so that machine noise hits both alike; printed are the
median and 90th percentile wall time of one tool call (spawn, run, read all output, wait).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time

from moonlet.agent.landlock import landlock_abi, probe
from moonlet.agent.sandbox import SandboxConfig
from moonlet.agent.tools import ToolContext, Workspace
from moonlet.agent.tools.shell import ShellTool


async def measure(commands: list[str], calls: int, workdir: str) -> dict:
    ctx = ToolContext(Workspace(workdir))
    tools = {"off": ShellTool(SandboxConfig("off")), "on": ShellTool(SandboxConfig("on"))}
    times: dict = {(c, m): [] for c in commands for m in tools}
    for _ in range(calls):
        for command in commands:
            for mode, tool in tools.items():
                start = time.perf_counter()
                result = await tool.run({"command": command}, ctx)
                times[(command, mode)].append(time.perf_counter() - start)
                if result.is_error:
                    raise SystemExit(f"{command!r} failed with the sandbox {mode}: {result.content}")
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--command", action="append", help="a command to time (repeatable; default: true, and "
                                                      "a small pipeline)")
    args = p.parse_args()
    if landlock_abi() < 1:
        print(f"no Landlock here: {probe()[1]}", file=sys.stderr)
        return 1
    commands = args.command or ["true", "ls /usr/bin | grep -c py > count.txt && cat count.txt"]
    with tempfile.TemporaryDirectory() as workdir:
        times = asyncio.run(measure(commands, args.calls, workdir))
    print(f"Landlock ABI {landlock_abi()}, {args.calls} calls each")
    print("| command | sandbox | median | p90 |")
    print("|---|---|---:|---:|")
    for (command, mode), ts in times.items():
        ts = sorted(ts)
        print(f"| `{command}` | {mode} | {statistics.median(ts) * 1000:.1f} ms | "
              f"{ts[int(0.9 * (len(ts) - 1))] * 1000:.1f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
