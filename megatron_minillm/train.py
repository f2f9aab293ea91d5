"""Distillation entry point: MiniLLM and the baselines, launched by torchrun or srun.

    torchrun --nproc-per-node 8 -m megatron_minillm.train --config examples/configs/minillm.yaml parallel.tp=2
    srun python -m megatron_minillm.train --config examples/configs/kd.yaml optimizer.lr=1e-5

Every key below can be set in the YAML file (sections as mappings) or as ``key=value`` /
``section.key=value`` after it. The resolved config is logged. Errors: one line, exit status 2 for
bad input, 1 otherwise (``MINILLM_DEBUG=1`` shows the traceback; megatron_minillm/cli.py). A SIGTERM
saves and ends with status 0; under torchrun launch with ``python -m megatron_minillm.launch`` (torchrun's
arguments) for the launcher's status to be 0 too.
"""

import argparse
import json
import logging
import os
import sys

from megatron_minillm.cli import run_cli
from megatron_minillm.config import describe, load_config
from megatron_minillm.parallel import destroy_distributed
from megatron_minillm.training.trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=describe(), formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config", help="YAML file of config keys (examples/configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value or section.key=value, applied after the file")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO lists every parameter of every bucket

    def body() -> None:
        cfg = load_config(args.config, args.overrides)
        trainer = Trainer(cfg)
        logging.getLogger("megatron_minillm.train").info("config %s", json.dumps(cfg.to_dict(), sort_keys=True))
        trainer.run()

    return run_cli(body, teardown=destroy_distributed)


if __name__ == "__main__":
    sys.exit(main())
