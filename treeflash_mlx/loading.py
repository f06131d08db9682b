"""Loading a target and its drafter, checked against each other; where the bundled demo pair lives; prompt files."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper

from . import distributed
from .checkpoints import MODEL_FILES, first_line, load_drafter, resolve, validate
from .drafter import Drafter
from .target import Target

DEMO = Path(__file__).parent / "demo"


def load(
    model: str, drafter: str | None = None, tokenizer_config: dict | None = None, pipeline: bool = False
) -> tuple[nn.Module, TokenizerWrapper, Drafter | None]:
    """Load an mlx-lm target and (optionally) a drafter for it, checking that they fit together.

    Under ``mlx.launch`` (more than one process) each process loads its shard of the target, as mlx-lm's
    ``sharded_load`` makes it: tensor parallelism, or with ``pipeline`` a pipeline of the layers; and the whole
    drafter (docs/distributed.md)."""
    from mlx_lm.utils import load as mlx_load

    model_path = resolve(model, MODEL_FILES, "model")
    sharded = distributed.world().size() > 1
    if pipeline and not sharded:
        raise ValueError("--pipeline shards the target over the processes mlx.launch starts; this process is alone "
                         "(launch it with mlx.launch, or drop --pipeline)")
    try:
        if sharded:
            distributed.check_shardable(model_path, pipeline)
            target_model, tokenizer = distributed.sharded_load(model_path, tokenizer_config, pipeline)
        else:
            target_model, tokenizer = mlx_load(str(model_path), tokenizer_config=tokenizer_config)
    except Exception as err:
        raise ValueError(f"cannot load model '{model}': {first_line(err)}") from err
    target_model.model_path = model_path
    target = Target(target_model)
    if drafter is None:
        return target_model, tokenizer, None
    dtype = target.embed_tokens.weight.dtype
    if not mx.issubdtype(dtype, mx.floating):  # quantized embedding: use its scales' dtype
        dtype = target.embed_tokens.scales.dtype
    draft_model, drafter_path = load_drafter(drafter, dtype=dtype)
    validate(draft_model.args, target)
    draft_model.path = drafter_path
    return target_model, tokenizer, draft_model


def demo_paths(model: str | None, drafter: str | None) -> tuple[str, str | None]:
    """The command lines' default: with no model, the bundled demo target and its drafter."""
    if model is not None:
        return model, drafter
    if drafter is not None:
        raise ValueError("--drafter needs --model: a drafter is made for one target")
    if not (DEMO / "target" / "config.json").is_file():
        raise FileNotFoundError(f"the demo pair is missing from {DEMO}; pass --model (and --drafter)")
    return str(DEMO / "target"), str(DEMO / "drafter")


def humaneval_messages(prompt: str) -> list[dict]:
    """A HumanEval problem as a coding assistant gets it: one user turn asking to complete the function."""
    return [{"role": "user", "content": f"Complete the following Python function:\n```python\n{prompt}```"}]


def read_jsonl_prompts(path: Path, tokenizer) -> list[list[int]]:
    """Token prompts of a JSONL file, one a line: ``{"messages": [...]}`` through the chat template (generation
    prompt added); a HumanEval problem (``task_id`` and ``prompt``) as ``humaneval_messages`` when the tokenizer
    has a chat template; any other ``{"prompt": text}`` as it is."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if "task_id" in item and "messages" not in item and getattr(tokenizer, "chat_template", None):
                item = {"messages": humaneval_messages(item["prompt"])}
            if "messages" in item:
                out.append(list(tokenizer.apply_chat_template(item["messages"], add_generation_prompt=True)))
            else:
                out.append(list(tokenizer.encode(item["prompt"])))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{path}:{n} is not a JSON object with a 'prompt' string or 'messages' list") from err
    return out
