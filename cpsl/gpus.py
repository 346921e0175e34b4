"""Check that a GPU job can use the GPUs it asked for, before the step (or torchrun) starts.

    python -m cpsl.gpus N [SETTING]   # exit 0 if CUDA works and N devices are visible, else one line, exit 2
    python -m cpsl.gpus auto          # what `gpu: auto` resolves to on this machine, and why


The workflow runs this in front of every step with ``resources.<kind>.gpu`` N >= 1 (see
``cpsl.workflow.step_command``; SETTING is the config key of that count), so that a job asked to run on GPUs
never silently trains on the CPU: a torch build whose CUDA needs a newer NVIDIA driver than the machine has (the
default ``torch==2.14.1`` wheel is the CUDA 13.0 build: driver >= 580, no V100), a CPU-only build, a GPU the
build has no kernels for, or fewer visible devices than requested (a local run on a smaller machine, a SLURM
allocation without ``--gpus``, a narrowed CUDA_VISIBLE_DEVICES) stop the job at once with one line that says
what to change (README: "Choosing the CUDA build of torch").
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cpsl.errors import CpslError

# The oldest Linux NVIDIA driver that runs a CUDA major version (CUDA's minor-version compatibility).
MIN_DRIVER = {13: "580", 12: "525", 11: "450"}
# What to install instead: an older CUDA build of the same torch release (README, "Choosing the CUDA build").
INSTALL_HINT = ("pip uninstall -y torch torchvision, then pip install torch=={version} torchvision --index-url "
                "https://download.pytorch.org/whl/cu126 (CUDA 12.6: driver >= 525, includes V100/sm_70)")
README_SECTION = 'README, "Choosing the CUDA build of torch"'


@dataclass(frozen=True)
class CudaFacts:
    """What this process knows about CUDA: the torch build, the driver, the visible devices."""

    torch_version: str
    cuda: str | None                   # torch.version.cuda (None: a CPU-only build)
    available: bool                    # torch.cuda.is_available()
    count: int                         # visible devices (0 when not available)
    driver: str | None = None          # the loaded NVIDIA kernel module's version, if any
    arch_list: tuple[str, ...] = ()    # torch.cuda.get_arch_list(): sm_XX the build has kernels for
    devices: tuple[tuple[str, tuple[int, int]], ...] = field(default=())  # (name, capability) of each device


def _driver_version() -> str | None:
    """The NVIDIA kernel module's version from /proc (no CUDA call), None when no driver is loaded."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    for word in text.split():
        if word[:1].isdigit() and "." in word:
            return word
    return None


def cuda_facts() -> CudaFacts:
    import torch

    available = torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    devices = tuple((torch.cuda.get_device_name(i), tuple(torch.cuda.get_device_capability(i)))
                    for i in range(count)) if available else ()
    archs = tuple(torch.cuda.get_arch_list()) if available else ()
    return CudaFacts(torch.__version__, torch.version.cuda, available, count, _driver_version(), archs, devices)


def visible_gpus() -> int:
    """The number of CUDA devices this process can use (after CUDA_VISIBLE_DEVICES)."""
    return cuda_facts().count


def _supported(cap: tuple[int, int], archs: tuple[str, ...]) -> bool:
    """Whether a build with kernels for ``archs`` runs on a device of compute capability ``cap``: its exact
    sm_XY, an sm_XZ of the same major with Z <= Y, or PTX (compute_XY) of an older or equal capability."""
    major, minor = cap
    for arch in archs:
        kind, _, num = arch.partition("_")
        if not num.isdigit():
            continue
        a_major, a_minor = int(num[:-1]), int(num[-1])
        if kind == "sm" and a_major == major and a_minor <= minor:
            return True
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return False


def check_gpus(requested: int, facts: CudaFacts | None = None, env: Mapping[str, str] | None = None,
               setting: str = "resources.gpu") -> None:
    """Raise CpslError (one line naming ``setting``) unless CUDA works here with at least ``requested``
    devices whose compute capability the torch build supports."""
    if requested <= 0:
        return
    env = os.environ if env is None else env
    facts = cuda_facts() if facts is None else facts
    where = f"{setting} is {requested} but"
    hint = INSTALL_HINT.format(version=facts.torch_version.split("+")[0])
    cpu_instead = f"or set {setting}: 0 to run on the CPU"
    if facts.cuda is None:
        raise CpslError(f"{where} torch {facts.torch_version} is a CPU-only build (torch.version.cuda is None): "
                        f"install a CUDA build, e.g. {hint} ({README_SECTION}), {cpu_instead}")
    if not facts.available:
        major = int(facts.cuda.split(".")[0])
        need = MIN_DRIVER.get(major, "?")
        found = (f"the NVIDIA driver here is {facts.driver}" if facts.driver else
                 "no NVIDIA driver is loaded here (no /proc/driver/nvidia/version)")
        raise CpslError(f"{where} CUDA is not usable: torch {facts.torch_version} is built for CUDA {facts.cuda} "
                        f"(torch.version.cuda), which needs an NVIDIA driver >= {need}"
                        f"{' and does not support V100 (sm_70) GPUs' if major >= 13 else ''}, and {found}: run on "
                        f"a GPU node, or install the torch build that matches the driver, e.g. {hint} "
                        f"({README_SECTION}), {cpu_instead}")
    if requested > facts.count:
        cvd = env.get("CUDA_VISIBLE_DEVICES")
        shown = "unset" if cvd is None else repr(cvd)
        raise CpslError(f"{where} {facts.count} CUDA device(s) are visible (CUDA_VISIBLE_DEVICES={shown}): run on "
                        f"a machine or SLURM allocation with {requested} GPUs, or lower {setting} of this rule in "
                        f"config.yaml")
    for name, cap in facts.devices[:requested]:
        if facts.arch_list and not _supported(cap, facts.arch_list):
            raise CpslError(f"{where} torch {facts.torch_version} (CUDA {facts.cuda}) has no kernels for {name} "
                            f"(sm_{cap[0]}{cap[1]}; the build has {' '.join(facts.arch_list)}): install the torch "
                            f"build for this GPU, e.g. {hint} ({README_SECTION}), {cpu_instead}")


# ``gpu: auto`` (the demo's setting) is resolved once per workflow run, by the Snakemake process that parses the
# Snakefile, and handed to every job (local or SLURM) through these variables, so that all jobs of a run agree.
AUTO_ENV = "CPSL_GPU_AUTO"
AUTO_REASON_ENV = "CPSL_GPU_AUTO_REASON"


def resolve_auto(env: dict | None = None, facts: CudaFacts | None = None) -> tuple[int, str]:
    """What ``gpu: auto`` means here: ``(1, why)`` when one CUDA device is usable (the same check as
    ``gpu: 1``: a CUDA build, a driver new enough for it, a visible device the build has kernels for), else
    ``(0, why)``. A value already in ``env[AUTO_ENV]`` (set by the run's first resolution) wins. Without an NVIDIA
    driver (no /proc/driver/nvidia/version) the answer is 0 without importing torch, so a CPU-only machine pays
    nothing for the check.

    Resolving stores the answer in ``env`` (default ``os.environ``), which the jobs inherit."""
    env = os.environ if env is None else env
    known = env.get(AUTO_ENV)
    if known in ("0", "1"):
        return int(known), env.get(AUTO_REASON_ENV, "")
    if facts is None and _driver_version() is None:
        answer, why = 0, "no NVIDIA driver is loaded here (no /proc/driver/nvidia/version): the CPU"
    else:
        facts = cuda_facts() if facts is None else facts
        try:
            check_gpus(1, facts, env=env, setting="gpu: auto")
        except CpslError as err:
            answer, why = 0, f"CUDA is not usable ({err}): the CPU"
        else:
            name = facts.devices[0][0] if facts.devices else "a CUDA device"
            answer, why = 1, f"one CUDA device ({name}; {facts.count} visible)"
    env[AUTO_ENV], env[AUTO_REASON_ENV] = str(answer), why
    return answer, why


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["auto"]:
        answer, why = resolve_auto()
        print(f"gpu: auto -> {answer}: {why}")
        return 0
    if len(argv) not in (1, 2) or not argv[0].isdigit():
        print("usage: python -m cpsl.gpus N [SETTING] | auto", file=sys.stderr)
        return 2
    try:
        check_gpus(int(argv[0]), setting=argv[1] if len(argv) == 2 else "resources.gpu")
    except CpslError as err:
        print(f"cpsl: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
