"""Check that a multi-GPU job sees the GPUs it asked for, before torchrun starts one process per GPU.

    python -m cpsl.gpus N     # exit 0 if at least N CUDA devices are visible, else one line on stderr, exit 2

The workflow runs this in front of ``torchrun --nproc_per_node N`` for a training rule with ``resources.gpu`` N > 1
(see ``cpsl.workflow.step_command``), so a job that got fewer GPUs than it requested (a local run on a smaller
machine, a SLURM allocation without ``--gpus``, a narrowed CUDA_VISIBLE_DEVICES) fails at once with a message
that says what to change, instead of N processes failing inside the process group.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from cpsl.errors import CpslError


def visible_gpus() -> int:
    """The number of CUDA devices this process can use (after CUDA_VISIBLE_DEVICES)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_gpus(requested: int, visible: int | None = None, env: Mapping[str, str] | None = None) -> None:
    """Raise CpslError unless at least ``requested`` CUDA devices are visible."""
    env = os.environ if env is None else env
    visible = visible_gpus() if visible is None else visible
    if requested > visible:
        cvd = env.get("CUDA_VISIBLE_DEVICES")
        shown = "unset" if cvd is None else repr(cvd)
        raise CpslError(f"resources.gpu is {requested} but {visible} CUDA device(s) are visible "
                        f"(CUDA_VISIBLE_DEVICES={shown}): run on a machine or SLURM allocation with {requested} "
                        f"GPUs, or lower resources.gpu of this rule in config.yaml")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m cpsl.gpus N", file=sys.stderr)
        return 2
    try:
        check_gpus(int(argv[0]))
    except CpslError as err:
        print(f"cpsl: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
