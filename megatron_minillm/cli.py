"""The error policy of every command-line tool: one line on stderr, a known exit status, no traceback.

* An error of the tool's input (a class of :data:`INPUT_ERRORS`, subclasses included): ``error: ...``
  naming the file, key or value and what to do; exit status 2.
* Anything else (a bug, an unexpected failure): ``error: <type>: ...`` and where to find the
  traceback; exit status 1.
* ``MINILLM_DEBUG=1`` adds the traceback to both, with the same exit status.
"""

import os
import sys
import traceback
from collections.abc import Callable

from megatron_minillm.checkpoint.dist_checkpoint import CheckpointWriteError, NotACheckpointError
from megatron_minillm.checkpoint.hf_mapping import CheckpointMismatchError
from megatron_minillm.config import ConfigError
from megatron_minillm.data import (
    DataFormatError,
    DatasetLayoutError,
    TemplateError,
    TokenizerError,
    TokenizerMismatchError,
)
from megatron_minillm.evaluation.evaluate import EvaluationError
from megatron_minillm.models.hf_config import UnsupportedModelError
from megatron_minillm.parallel import LayoutError
from megatron_minillm.paths import OutputPathError
from megatron_minillm.planning.memory import PlanError
from megatron_minillm.sampling import GenerationError
from megatron_minillm.training.schedule import NonFiniteLossError

DEBUG_ENV = "MINILLM_DEBUG"
INPUT_STATUS, UNEXPECTED_STATUS = 2, 1

# The package's errors about what it was given (damaged checkpoints, data errors etc. subclass these),
# and the OS's about the user's paths.
INPUT_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    LayoutError,
    NotACheckpointError,
    CheckpointMismatchError,
    CheckpointWriteError,
    UnsupportedModelError,
    TokenizerError,
    TokenizerMismatchError,
    DataFormatError,
    DatasetLayoutError,
    TemplateError,
    GenerationError,
    EvaluationError,
    PlanError,
    NonFiniteLossError,
    OutputPathError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_cli(
    body: Callable[[], int | None],
    *,
    input_errors: tuple[type[BaseException], ...] = (),
    teardown: Callable[[], None] | None = None,
) -> int:
    """Run a tool's ``body`` under the policy; return its exit status (``body``'s own, else 0).

    ``input_errors``: the tool's own error classes besides :data:`INPUT_ERRORS` (e.g. the
    evaluator's); ``teardown`` runs either way (e.g. ``destroy_distributed``).
    """
    try:
        return body() or 0
    except (*INPUT_ERRORS, *input_errors) as err:
        return _report(f"error: {err}", INPUT_STATUS)
    except Exception as err:  # the policy's point: no traceback unless asked for
        hint = "" if debug() else f" (unexpected; {DEBUG_ENV}=1 shows the traceback)"
        return _report(f"error: {type(err).__name__}: {err}{hint}", UNEXPECTED_STATUS)
    finally:
        if teardown is not None:
            teardown()


def _report(line: str, status: int) -> int:
    if debug():
        traceback.print_exc()
    print(line, file=sys.stderr, flush=True)
    return status
