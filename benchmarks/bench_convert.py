"""Streamed conversion of a random-init ~1B-parameter LLaMA: peak RSS per process and seconds per GB.

    python benchmarks/bench_convert.py [--workdir DIR] [--nproc 4]

Builds the HF model once (fp32, sharded safetensors), then times `tools/checkpoint/convert.py`
hf-to-mcore and mcore-to-hf (a) in one process (PP=1: the whole model in that process) and (b)
under torchrun with --nproc pipeline stages (each process streams only its layers). Peak RSS is
the largest single process of each run (ru_maxrss of the waited-for children, measured in a fresh
wrapper process). The last line is one JSON with the ratios.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONVERT = str(ROOT / "tools" / "checkpoint" / "convert.py")
CONFIG = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=8,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)

# Runs a command and reports the peak RSS of its largest descendant, isolated from this process.
_WRAPPER = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); "
    "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
    "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"
)


def make_hf_model(directory: Path) -> None:
    code = (
        "import sys, torch, transformers; torch.manual_seed(0); "
        f"cfg = transformers.LlamaConfig(**{CONFIG!r}); "
        "m = transformers.LlamaForCausalLM(cfg); "
        "m.save_pretrained(sys.argv[1], max_shard_size='1GB')"
    )
    subprocess.run([sys.executable, "-c", code, str(directory)], check=True)


def measured(cmd: list[str]) -> tuple[float, int]:
    out = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], check=True, capture_output=True, text=True)
    seconds, rss = out.stdout.split()
    return float(seconds), int(rss)


def dir_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--nproc", type=int, default=4)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_convert_"))
    hf = work / "hf"
    if not hf.exists():
        make_hf_model(hf)
    ckpt_gb = dir_bytes(hf) / 2**30
    launchers = {
        "pp1": [sys.executable, CONVERT],
        f"pp{args.nproc}": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(args.nproc),
            CONVERT,
        ],
    }
    result = {"checkpoint_gb": round(ckpt_gb, 2)}
    for name, launch in launchers.items():
        shutil.rmtree(work / "mcore", ignore_errors=True)
        shutil.rmtree(work / "back", ignore_errors=True)
        t1, rss1 = measured([*launch, "hf-to-mcore", "--hf", str(hf), "--out", str(work / "mcore")])
        t2, rss2 = measured([*launch, "mcore-to-hf", "--ckpt", str(work / "mcore"), "--out", str(work / "back")])
        print(
            f"{name}: hf-to-mcore {t1:.1f} s, peak RSS {rss1 / 2**30:.2f} GB; "
            f"mcore-to-hf {t2:.1f} s, peak RSS {rss2 / 2**30:.2f} GB; checkpoint {ckpt_gb:.2f} GB"
        )
        result[f"peak_rss_vs_ckpt_{name}"] = round(max(rss1, rss2) / 2**30 / ckpt_gb, 3)
        result[f"s_per_gb_hf_to_mcore_{name}"] = round(t1 / ckpt_gb, 2)
        result[f"s_per_gb_mcore_to_hf_{name}"] = round(t2 / ckpt_gb, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
