"""megatron_minillm: on-policy knowledge distillation (MiniLLM) on megatron-core."""

import warnings

__version__ = "0.1.0"

# megatron-core announces each missing optional GPU kernel (apex, transformer-engine) once per
# import on every rank; the pure-PyTorch fallbacks it names are the expected path on CPU.
for _message in (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"When using async grad allreduce it is recommended",
    r"full scope is deprecated",
):
    warnings.filterwarnings("ignore", message=_message)
