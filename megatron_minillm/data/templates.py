"""Prompt templates: an :class:`Example` -> the prompt text the model continues with its response.

- ``alpaca`` (default): the Alpaca-style template of LMOps/MiniLLM, the exact strings of
  microsoft/LMOps ``minillm/tools/process_data_dolly.py`` (``Encoder.encode``, non-qwen2 branch):
  the "paired with an input" variant when the input is non-empty, the no-input variant otherwise.
  Keeping them byte-identical keeps prompts comparable with the paper's checkpoints and numbers.
- ``chat``: the tokenizer's own chat template (``apply_chat_template(add_generation_prompt=True)``),
  for chat-tuned teachers; an example without messages becomes one user message.
- ``none``: the instruction as is (then a blank line and the input, if any): for data whose prompt
  is already complete, e.g. prompt/completion records.
"""

from typing import Protocol

from megatron_minillm.data.formats import Example

TEMPLATES = ("alpaca", "chat", "none")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


class TemplateError(ValueError):
    """An example or a tokenizer the chosen template cannot render; names the example's place."""

    reason = "template"


class ChatTokenizer(Protocol):
    path: str
    has_chat_template: bool

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str: ...


def _single_turn(example: Example, template: str) -> Example:
    """Alpaca and none take one user turn: a chat example must be exactly one user message."""
    if example.messages and [m["role"] for m in example.messages] != ["user"]:
        roles = ", ".join(m["role"] for m in example.messages)
        raise TemplateError(
            f"{example.source}: the {template!r} template takes one user message before the "
            f"response, this conversation has [{roles}]; use the 'chat' template"
        )
    return example


def require_chat_template(tokenizer: ChatTokenizer | None) -> ChatTokenizer:
    if tokenizer is None or not tokenizer.has_chat_template:
        where = tokenizer.path if tokenizer is not None else "no tokenizer given"
        raise TemplateError(f"the 'chat' template needs a tokenizer with a chat template ({where} has none)")
    return tokenizer


def render_prompt(example: Example, template: str, tokenizer: ChatTokenizer | None = None) -> str:
    """The prompt text of ``example`` (the response follows it directly, with no separator)."""
    if template == "alpaca":
        example = _single_turn(example, template)
        if example.input:
            return ALPACA_PROMPT_WITH_INPUT.format(instruction=example.instruction, input=example.input)
        return ALPACA_PROMPT.format(instruction=example.instruction)
    if template == "none":
        example = _single_turn(example, template)
        return f"{example.instruction}\n\n{example.input}" if example.input else example.instruction
    if template == "chat":
        messages = list(example.messages) or [{"role": "user", "content": render_prompt(example, "none")}]
        return require_chat_template(tokenizer).apply_chat_template(messages)
    raise ValueError(f"unknown template {template!r}; one of {', '.join(TEMPLATES)}")
