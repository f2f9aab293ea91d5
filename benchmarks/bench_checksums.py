"""What the checkpoint manifest's SHA-256 costs: save and load of the ~0.9B LLaMA, with and without.

    python benchmarks/bench_checksums.py [--workdir DIR]

One process (TP = PP = 1). Builds the random-init HF model of bench_convert.py once (fp32, 3.5 GB),
converts it to a native checkpoint with ``checksums=False`` and with ``checksums=True``, then loads
each checkpoint both ways. Loads are repeated after a first warm-up read, so both variants read
from the page cache (a cold read from a network filesystem makes the hashing relatively cheaper).
The last line is one JSON with the ratios and the hashing throughput; the cost of a training
checkpoint follows from its size (model + 12 bytes per parameter of optimizer state).
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import dir_bytes, make_hf_model  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="default: a temporary directory, removed at the end")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_checksums_"))
    work.mkdir(parents=True, exist_ok=True)

    from megatron_minillm.checkpoint.convert import convert_hf_to_mcore
    from megatron_minillm.checkpoint.dist_checkpoint import load_model
    from megatron_minillm.checkpoint.integrity import verify_manifest
    from megatron_minillm.parallel import init_distributed

    hf_dir = work / "hf"
    if not (hf_dir / "config.json").is_file():
        make_hf_model(hf_dir)
    init_distributed(tp=1, pp=1)
    save = {}
    for checksums in (False, True):
        out = work / f"native_{'sha' if checksums else 'sizes'}"
        shutil.rmtree(out, ignore_errors=True)
        save[checksums] = timed(lambda: convert_hf_to_mcore(hf_dir, out, checksums=checksums))  # noqa: B023
    sha_dir = work / "native_sha"
    size_gb = dir_bytes(sha_dir) / 1e9
    load_model(sha_dir, checksums=False)  # warm the page cache for both variants
    load = {c: timed(lambda: load_model(sha_dir, checksums=c)) for c in (False, True)}  # noqa: B023
    verify = timed(lambda: verify_manifest(sha_dir, ("", "model"), checksums=True))
    result = {
        "checkpoint_gb": round(size_gb, 2),
        "save_s": {"sizes_only": round(save[False], 1), "sha256": round(save[True], 1)},
        "load_s": {"sizes_only": round(load[False], 1), "sha256": round(load[True], 1)},
        "save_with_vs_without": round(save[True] / save[False], 3),
        "load_with_vs_without": round(load[True] / load[False], 3),
        "sha256_gb_per_s": round(size_gb / verify, 2),
    }
    for key, value in result.items():
        print(f"{key:>22}: {value}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
