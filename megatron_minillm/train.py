"""Distillation entry point: MiniLLM and the baselines, launched by torchrun or srun.

    torchrun --nproc-per-node 8 -m megatron_minillm.train --config examples/configs/minillm.yaml parallel.tp=2
    srun python -m megatron_minillm.train --config examples/configs/kd.yaml optimizer.lr=1e-5

Every key below can be set in the YAML file (sections as mappings) or as ``key=value`` /
``section.key=value`` after it. The resolved config is logged. Exits with status 2 and one message
on a configuration error.
"""

import argparse
import json
import logging
import os
import sys

from megatron_minillm.checkpoint.dist_checkpoint import NotACheckpointError
from megatron_minillm.config import ConfigError, describe, load_config
from megatron_minillm.data import DatasetLayoutError, TokenizerError, TokenizerMismatchError
from megatron_minillm.parallel import LayoutError, cli_exit_status
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

    return cli_exit_status(
        body,
        (
            ConfigError,
            LayoutError,
            NotACheckpointError,
            TokenizerError,
            TokenizerMismatchError,
            DatasetLayoutError,
            FileNotFoundError,
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
