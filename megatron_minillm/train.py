"""Distillation entry point: MiniLLM and the baselines, launched by torchrun or srun.

    torchrun --nproc-per-node 8 -m megatron_minillm.train --config examples/minillm.yaml tp=2 pp=2
    srun python -m megatron_minillm.train --config examples/minillm.yaml algorithm=kd lr=1e-5

Every field of ``training.config.TrainConfig`` can be set in the YAML file or as ``key=value``.
The resolved config is logged. Exits with status 2 and one message on a configuration error.
"""

import argparse
import json
import logging
import os
import sys

from megatron_minillm.checkpoint.dist_checkpoint import NotACheckpointError
from megatron_minillm.data import DatasetLayoutError, TokenizerError, TokenizerMismatchError
from megatron_minillm.parallel import LayoutError, cli_exit_status
from megatron_minillm.training.config import ConfigError, load_config
from megatron_minillm.training.trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", help="YAML file of TrainConfig fields")
    parser.add_argument("overrides", nargs="*", help="key=value, applied after the file")
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
