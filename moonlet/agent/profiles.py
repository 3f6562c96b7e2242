"""Tool profiles: which tools an agent offers, and under which descriptions.

A small model only calls tools reliably when the request looks like its training data. A checkpoint
can say so in an ``agent_profile.json`` next to its config.json::

    {"tools": [{"name": "calculator", "description": "...", "input_schema": {...}}, ...],
     "system_prompt": "You are ...", "temperature": 0}

(tools in the Anthropic shape, or OpenAI's ``{"type": "function", "function": {...}}``). When the agent
serves such a checkpoint itself it offers exactly those tools, with the trained names, descriptions
and schemas, the trained system prompt, and the sampling temperature the model was evaluated with
(unless ``--temperature`` says otherwise; the API's default of 1.0 is far too random for a tiny
model, which then miscopies long numbers now and then). The tiny recipe writes the file on export, so the bundled
moonlet-tiny (trained with calculator and read_file, `moonlet.train.synth.TOOLS`) and any checkpoint
trained with the recipe carry their profile; other checkpoints get every tool."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .tools.base import ToolError, ToolRegistry

PROFILE_FILE = "agent_profile.json"


def _normalize_tool(spec: dict, where: str) -> tuple[str, dict]:
    fn = spec.get("function", spec) if isinstance(spec, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError(f"{where}: each tool needs a name (Anthropic or OpenAI shape); got {spec!r}")
    schema = fn.get("input_schema", fn.get("parameters", {"type": "object", "properties": {}}))
    return fn["name"], {"description": fn.get("description", ""), "input_schema": schema}


def profile_from_dict(data: dict, where: str = PROFILE_FILE) -> dict:
    """{"tools": [names], "overrides": {name: {description, input_schema}}, "system_prompt": str|None,
    "temperature": float|None}."""
    if not isinstance(data, dict) or not isinstance(data.get("tools"), list) or not data["tools"]:
        raise ValueError(f"{where}: expected an object with a non-empty \"tools\" list")
    overrides = dict(_normalize_tool(t, where) for t in data["tools"])
    system = data.get("system_prompt")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"{where}: \"system_prompt\" must be a string")
    temperature = data.get("temperature")
    if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                    or not 0 <= temperature <= 1):
        raise ValueError(f"{where}: \"temperature\" must be a number from 0 to 1; got {temperature!r}")
    return {"tools": list(overrides), "overrides": overrides, "system_prompt": system,
            "temperature": None if temperature is None else float(temperature)}


def checkpoint_profile(model_dir: str | os.PathLike) -> dict | None:
    """The profile a checkpoint directory declares (see the module docstring), or None."""
    path = Path(model_dir) / PROFILE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or delete it") from None
    return profile_from_dict(data, str(path))


def model_profile(model_path: str | os.PathLike | None) -> dict | None:
    """The profile for the model the agent serves itself: the checkpoint's own file (``model_path``
    None: the bundled moonlet-tiny, which ships one)."""
    if model_path is None:
        from moonlet.assets import default_model_path

        model_path = default_model_path()
    return checkpoint_profile(model_path)


def apply_profile(registry: ToolRegistry, names: list[str] | None, overrides: dict | None) -> ToolRegistry:
    """Keep only `names` (in that order; task/swarm silently absent at the depth limit) and set the
    overridden descriptions/schemas. Unknown names raise with the list of available tools."""
    if names:
        unknown = [n for n in names if n not in registry.tools and n not in ("task", "swarm")]
        if unknown:
            raise ToolError(f"unknown tool(s) {', '.join(unknown)}; available: {', '.join(registry.names())}")
        registry.tools = {n: registry.tools[n] for n in names if n in registry.tools}
        registry.allowed = set(names)  # an MCP server's tools added later must be named too
    for name, o in (overrides or {}).items():
        tool = registry.tools.get(name)
        if tool is not None:
            tool.description = o.get("description", tool.description)
            tool.input_schema = o.get("input_schema", tool.input_schema)
    return registry
