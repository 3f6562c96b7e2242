"""The tiny-draft recipe's pieces: teacher documents carry loss exactly on what the teacher wrote,
and the draft's starting weights are the teacher's where the shapes agree."""

import torch

from moonlet.assets import default_model_path
from moonlet.engine import LLM, SamplingParams
from moonlet.train.recipes import get_recipe, tiny_draft


def test_recipe_is_registered_and_sized_like_moonlet_tiny():
    assert get_recipe("tiny-draft") is tiny_draft
    cfg = tiny_draft.train_config("unused").model_config()
    assert cfg.num_hidden_layers == tiny_draft.NUM_LAYERS == cfg.first_k_dense_replace
    assert [tiny_draft.teacher_layer(i, 2, 4) for i in range(2)] == [0, 3]


def test_teacher_documents_mask_exactly_the_teachers_tokens():
    """Each masked span must be what the teacher generates greedily from the tokens before it
    (recomputed here one span at a time), and nothing else may be masked."""
    from moonlet.train.synth import TASK_MIX, generate_tasks

    llm = LLM(str(default_model_path()), dtype="float32", num_blocks=256)
    tasks = generate_tasks(4, seed=3, mix=TASK_MIX, quote_paths=True)
    docs = tiny_draft.teacher_conversations(llm, tasks, 0.0, 0)
    assert len(docs) >= len(tasks)
    stop = set(llm.tokenizer.stop_token_ids)
    spans = 0
    for ids, mask in docs:
        assert len(ids) == len(mask) and mask[0] == 0
        j = 0
        while j < len(ids):
            if not mask[j]:
                j += 1
                continue
            end = j
            while end < len(ids) and mask[end]:
                end += 1
            want = llm.generate([ids[:j]], SamplingParams(temperature=0, max_tokens=tiny_draft.MAX_TOKENS))[0]
            assert ids[j:end] == want.token_ids
            assert ids[end - 1] in stop or end - j == tiny_draft.MAX_TOKENS
            spans += 1
            j = end
    assert spans > len(tasks)  # tool rounds: several teacher turns per conversation


def test_init_checkpoint_starts_from_the_teachers_weights(tmp_path):
    from safetensors.torch import load_file

    from moonlet.train.data import write_dataset
    from moonlet.weights import load_model

    cfg = tiny_draft.train_config(tmp_path, max_steps=1)
    (tmp_path / "tokenizer").mkdir()
    tiny_draft.copy_tokenizer(default_model_path(), tmp_path / "tokenizer")
    tiny_draft.match_tokenizer(cfg)
    for split in ("train", "eval"):
        write_dataset([(list(range(1, 50)), None)] * 4, tmp_path / "data" / split, cfg.model["vocab_size"])
    tiny_draft.build_init(cfg, log=lambda m: None)
    init = tmp_path / "init" / "checkpoints" / "step-000000"
    weights = {}
    for f in init.glob("*.safetensors"):
        weights.update(load_file(str(f)))
    teacher = load_model(str(default_model_path()), dtype=torch.float32).state_dict()
    assert len(weights) == 15
    for name, value in weights.items():
        torch.testing.assert_close(value, teacher[name], rtol=0, atol=0)
