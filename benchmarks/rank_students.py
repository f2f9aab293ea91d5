"""Rank layer-dropped students before any training: their LM loss on the teacher's own answers.

    python benchmarks/rank_students.py --teacher-hf runs/demo/teacher_hf [--prompts 32] [--candidates 0-3,22-29 ...]

The teacher (an HF directory, e.g. the demo's SmolLM2-135M-Instruct) answers --prompts training
prompts (examples/data/t0_train_600.jsonl, chat template, prompts <= 128 tokens) and --prompts SelfInst
prompts that the demo does not evaluate on (rows 48 on), sampled at temperature 1 (the SeqKD data);
each candidate student (a subset of the teacher's layers, in memory) is scored by its per-token cross
entropy on those answers, teacher-forced. Candidates: evenly spaced layers (make_student.py
--num-layers K) and contiguous blocks (the first A layers + the last B, the "deep middle layers are
redundant" finding of ShortGPT / Gromov et al. 2024), for K = 8, 10, 12, 15, or the sets given by
--candidates. 10-60 s per candidate on 2 CPU cores. The last line is one JSON with every loss
(docs/results.md, "Choosing the student").
"""

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chat_prompts(tok, path: Path, n: int, skip: int = 0, max_prompt: int = 128) -> list[list[int]]:
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        if i < skip:
            continue
        row = json.loads(line)
        if "prompt" in row:
            text = row["prompt"]
        else:  # SelfInst: instruction + the first instance's input
            inp = row["instances"][0]["input"]
            text = row["instruction"] + (f"\n\n{inp}" if inp else "")
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        if len(ids) <= max_prompt:
            out.append(list(ids))
        if len(out) == n:
            break
    return out


@torch.no_grad()
def teacher_answers(model, tok, prompts: list[list[int]], new_tokens: int, batch: int = 16) -> list[list[int]]:
    torch.manual_seed(1)
    answers = []
    for b in range(0, len(prompts), batch):
        chunk = prompts[b : b + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        gen = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            max_new_tokens=new_tokens, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
        for row in gen[:, width:].tolist():
            cut = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
            answers.append(row[:cut])
    return answers


@torch.no_grad()
def answer_loss(model, prompts, answers, keep: list[int] | None, batch: int = 16) -> float:
    """Mean per-token CE of the answers given the prompts, with only the layers ``keep`` (None: all)."""
    layers = model.model.layers
    if keep is not None:
        model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    total, count = 0.0, 0
    try:
        for b in range(0, len(prompts), batch):
            seqs = [p + a for p, a in zip(prompts[b : b + batch], answers[b : b + batch])]
            width = max(map(len, seqs))
            ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
            labels = torch.full_like(ids, -100)
            for r, (p, a) in enumerate(zip(prompts[b : b + batch], answers[b : b + batch])):
                labels[r, len(p) : len(p) + len(a)] = torch.tensor(a)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
            ce = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum", ignore_index=-100
            )
            total += ce.item()
            count += int((labels[:, 1:] != -100).sum())
    finally:
        model.model.layers = layers
    return total / count


def parse_layers(spec: str) -> list[int]:
    """ "0-3,26-29" -> [0, 1, 2, 3, 26, 27, 28, 29]."""
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def evenly(n: int, k: int) -> list[int]:
    return [round(i * (n - 1) / (k - 1)) for i in range(k)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--teacher-hf", required=True)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--candidates", nargs="+", help="layer sets instead of the default list, e.g. 0-3,24-29")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    tok = AutoTokenizer.from_pretrained(args.teacher_hf)
    model = AutoModelForCausalLM.from_pretrained(args.teacher_hf, dtype=torch.float32).eval()
    n = model.config.num_hidden_layers
    data = ROOT / "examples/data"
    sets = {
        "t0": chat_prompts(tok, data / "t0_train_600.jsonl", args.prompts),
        "selfinst": chat_prompts(tok, data / "self_instruct_user_oriented_252.jsonl", args.prompts, skip=48),
    }
    t = time.time()
    answers = {k: teacher_answers(model, tok, p, args.new_tokens) for k, p in sets.items()}
    lens = {k: sum(map(len, a)) / len(a) for k, a in answers.items()}
    print(f"teacher answers: {lens} tokens on average ({time.time() - t:.0f} s)")

    candidates = {"teacher (all 30)": None}
    for k in (8, 10, 12, 15):
        candidates[f"evenly {k}"] = evenly(n, k)
        for last in (1, 2, 4):
            candidates[f"first {k - last} + last {last}"] = list(range(k - last)) + list(range(n - last, n))
    if args.candidates:
        candidates = {spec: parse_layers(spec) for spec in args.candidates}
    results = {}
    for name, keep in candidates.items():
        t = time.time()
        results[name] = {k: answer_loss(model, sets[k], answers[k], keep) for k in sets}
        print(f"{name:24s} t0 {results[name]['t0']:6.2f}  selfinst {results[name]['selfinst']:6.2f}  "
              f"({time.time() - t:.1f} s) layers {keep}", flush=True)  # fmt: skip

    print(json.dumps({"answer_tokens": lens, "loss": results}))


if __name__ == "__main__":
    main()
