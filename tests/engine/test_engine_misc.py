"""Loading an engine from a checkpoint directory, the CLI flags, the offline benchmark helpers."""

import argparse

import pytest
import torch

from moonlet.engine import LLM, SamplingParams
from moonlet.engine.benchmark import bench_engine, bench_sequential, format_table, random_prompts
from moonlet.engine.config import add_engine_cli_args, engine_args_from_cli
from moonlet.testing import random_model, tiny_k2_config, tiny_tokenizer_dir
from moonlet.weights import save_model


def test_llm_from_checkpoint_directory(tmp_path):
    tiny_tokenizer_dir(tmp_path)
    model = random_model(tiny_k2_config(vocab_size=768), seed=2)
    save_model(model, tmp_path)
    llm = LLM(str(tmp_path), num_blocks=32, device="cpu")
    assert llm.model_name == tmp_path.name and llm.tokenizer is not None
    out = llm.generate(["hello world"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    ids = llm.tokenizer.encode("hello world")
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out.token_ids == ids[-5:]
    with pytest.raises(FileNotFoundError, match="not a directory"):
        LLM(str(tmp_path / "missing"))


def test_unknown_engine_argument_is_named():
    with pytest.raises(TypeError, match="max_num_seq\\b"):
        LLM(model=random_model(tiny_k2_config()), max_num_seq=3)


def test_cli_flags_map_to_engine_config():
    parser = argparse.ArgumentParser()
    add_engine_cli_args(parser)
    args = parser.parse_args(["--kv-cache-memory", "64MiB", "--block-size", "8", "--no-prefix-caching",
                              "--max-num-seqs", "4"])
    kwargs = engine_args_from_cli(args)
    llm = LLM(model=random_model(tiny_k2_config()), **kwargs)
    rc = llm.engine.config
    assert rc.block_size == 8 and rc.max_num_seqs == 4 and not rc.enable_prefix_caching
    assert rc.num_blocks == min(64 * 2**20 // (3 * 8 * 48 * 4), 4 * 4096 // 8)


def test_benchmark_helpers_count_tokens():
    model = random_model(tiny_k2_config())
    llm = LLM(model=model, num_blocks=64)
    prompts = random_prompts(3, 10, 320)
    engine_row = bench_engine(llm, prompts, 4)
    base_row = bench_sequential(model, prompts, 4)
    assert engine_row["output_tokens"] == base_row["output_tokens"] == 12
    assert engine_row["prompt_tokens"] == 30
    table = format_table([engine_row, base_row])
    assert table.splitlines()[0].startswith("| run |") and len(table.splitlines()) == 4


@pytest.mark.parametrize("command", [["serve"], ["chat"], ["bench", "offline"]])
def test_every_engine_command_takes_the_same_engine_flags(command):
    """serve, chat and bench offline share the engine's flag set, GPU settings included, and pass only
    the flags given (the rest keep EngineConfig's defaults)."""
    from moonlet.cli import build_parser

    args = build_parser().parse_args(command + ["--decode-graphs", "eager", "--decode-kernel", "reference",
                                                "--prefill-attention", "absorbed", "--num-blocks", "7",
                                                "--no-chunked-prefill"])
    assert engine_args_from_cli(args) == dict(decode_graphs="eager", decode_kernel="reference",
                                              prefill_attention="absorbed", num_blocks=7,
                                              enable_chunked_prefill=False)
    assert engine_args_from_cli(build_parser().parse_args(command)) == {}
