"""The agent's built-in tools and the factory that assembles a tool set for an agent at a given
sub-agent depth (sub-agents below the depth limit get no task/swarm tools)."""

from __future__ import annotations

from .base import Tool, ToolChanges, ToolContext, ToolError, ToolRegistry, ToolResult, validate_args
from .calculator import CalculatorTool
from .files import ReadFileTool, StrReplaceTool, WriteFileTool
from .notes import PinNoteTool, TodoTool
from .search import GlobTool, GrepTool
from .shell import JobOutputTool, ShellTool
from .web import WebFetchTool
from .workspace import Workspace

__all__ = ["Tool", "ToolChanges", "ToolContext", "ToolError", "ToolRegistry", "ToolResult", "Workspace", "validate_args",
           "make_tools"]


def make_tools(depth: int = 0, max_depth: int = 1, extra: list[Tool] | tuple = (),
               sources: list | tuple = ()) -> ToolRegistry:
    """A fresh registry (own shell jobs) for one agent. `extra` tools are shared; `sources` (MCP
    clients) provide tools that may change during the session (see ToolRegistry)."""
    from ..swarm import SwarmTool, TaskTool

    reg = ToolRegistry()
    shell = ShellTool()
    for tool in (shell, JobOutputTool(shell), ReadFileTool(), WriteFileTool(), StrReplaceTool(), GlobTool(),
                 GrepTool(), WebFetchTool(), TodoTool(), PinNoteTool(), CalculatorTool()):
        reg.add(tool)
    if depth < max_depth:
        reg.add(TaskTool())
        reg.add(SwarmTool())
    for tool in extra:
        reg.add(tool)
    for source in sources:
        reg.add_source(source)
    return reg
