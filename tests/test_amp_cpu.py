"""bf16 AMP on the CPU (#21 item 2): the same autocast regions as on a GPU, close to float32.

One iteration of every training stage runs twice from the same weights and batch, with ``amp: off`` and
``amp: bf16``. Asserted: under bf16 the convolutions compute in bfloat16 while the weights stay float32 (master
weights), the Sinkhorn receives float32 scores, every loss is float32, and the losses and updated weights stay
within a stated tolerance of float32's.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cpsl.config import TrainConfig, load
from cpsl.methods import Amp, TrainContext, build_method
from cpsl.methods import sinkhorn as sinkhorn_module
from cpsl.train.data import build_datasets, build_loaders
from cpsl.train.dist import DistInfo
from tests.test_distill import _distill_dict, _tiny_checkpoint, stage1  # noqa: F401
from tests.test_selflabel import stage1_dict
from tests.train_helpers import one_thread, pair_dir, train_dict  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
# bf16 keeps 8 bits of mantissa: relative error ~4e-3 per operation, more in gradients that cancel. Measured on
# these tiny randomly initialised networks (one SGD step; printed with -s): losses within 1.0e-2 relative, the
# step's weight update 0.17-0.23 off in relative norm (source_only 0.166, warmup 0.166, oracle 0.229, stage1 0.197,
# stage2/3 0.183), BatchNorm statistics within 1.4e-3. The bounds leave about 2x room; a wrong autocast region
# (a loss or the Sinkhorn in bf16, fp16 overflow) shows as errors near 1 or as the dtype checks failing.
LOSS_RTOL = 5e-2
UPDATE_RTOL = 0.45
BUFFER_RTOL = 0.01


def _run(cfg: TrainConfig, mode: str, monkeypatch, conv_dtypes: set, sinkhorn_dtypes: set):
    torch.manual_seed(0)
    method = build_method(cfg, TrainContext(CPU, DistInfo(0, 1, 0, CPU), Amp(mode, CPU)))
    loaders = build_loaders(cfg, build_datasets(cfg, method.domains, cfg.model.n_class), rank=0, world_size=1,
                            start_iter=0)
    batch = {d: next(iter(loader)) for d, loader in loaders.items()}

    def hook(module, inputs, output):
        conv_dtypes.add(output.dtype)

    handles = [m.register_forward_hook(hook) for m in method.student.modules() if isinstance(m, nn.Conv2d)]
    real = sinkhorn_module.sinkhorn

    def recording(scores, *args, **kwargs):
        sinkhorn_dtypes.add(scores.dtype)
        return real(scores, *args, **kwargs)

    monkeypatch.setattr(sinkhorn_module, "sinkhorn", recording)
    before = {k: v.detach().clone() for k, v in method.student.named_parameters()}
    method.train_mode()
    torch.manual_seed(1)
    losses = method.step(batch)
    for h in handles:
        h.remove()
    for k, v in losses.items():
        if isinstance(v, torch.Tensor):
            assert v.dtype == torch.float32, (mode, k, v.dtype)
    params = {k: v.detach().clone() for k, v in method.student.named_parameters()}
    buffers = {k: v.clone() for k, v in method.student.named_buffers() if v.is_floating_point()}
    assert all(v.dtype == torch.float32 for v in params.values())  # float32 master weights
    return {k: float(v) for k, v in losses.items()}, params, buffers, before


def _compare(cfg: TrainConfig, monkeypatch, stage1_run: bool = False) -> None:
    convs32, convs16, sk32, sk16 = set(), set(), set(), set()
    l32, w32, b32, w0 = _run(cfg, "off", monkeypatch, convs32, sk32)
    l16, w16, b16, _ = _run(cfg, "bf16", monkeypatch, convs16, sk16)
    assert convs32 == {torch.float32} and convs16 == {torch.bfloat16}
    if stage1_run:
        assert sk16 and sk16 <= {torch.float32, torch.float64}, sk16  # the Sinkhorn never sees bf16 scores
    assert set(l32) == set(l16)
    for k in l32:
        assert l16[k] == pytest.approx(l32[k], rel=LOSS_RTOL, abs=1e-4), k
    # the step's update of the weights, bf16 against float32: relative error of the whole update vector
    d16 = torch.cat([(w16[k] - w0[k]).flatten() for k in w0])
    d32 = torch.cat([(w32[k] - w0[k]).flatten() for k in w0])
    update_err = ((d16 - d32).norm() / d32.norm()).item()
    # buffers (BatchNorm statistics of bf16 activations): relative error of the whole vector
    buf_err = (torch.cat([(b16[k] - b32[k]).flatten() for k in b32]).norm()
               / torch.cat([b32[k].flatten() for k in b32]).norm()).item()
    print(f"bf16 vs float32, {cfg.stage}: update {update_err:.4f}, buffers {buf_err:.4f}")
    assert 0.0 < update_err <= UPDATE_RTOL, update_err  # bf16 changed the result (it ran), by little
    assert buf_err <= BUFFER_RTOL, buf_err


@pytest.mark.parametrize("stage", ["source_only", "warmup", "oracle"])
def test_bf16_on_the_cpu_base_stages(pair_dir, stage, monkeypatch):  # noqa: F811
    over = {"data.source": None} if stage == "oracle" else {}
    _compare(load(TrainConfig, train_dict(pair_dir, stage, **over)), monkeypatch)


def test_bf16_on_the_cpu_stage1(pair_dir, monkeypatch):  # noqa: F811
    _compare(load(TrainConfig, stage1_dict(pair_dir, **{"selflabel.cutmix_p": 0.0})), monkeypatch, stage1_run=True)


@pytest.mark.parametrize("stage", ["stage2", "stage3"])
def test_bf16_on_the_cpu_distill_stages(pair_dir, stage1, stage, tmp_path, monkeypatch):  # noqa: F811
    over = {}
    if stage == "stage3":
        over["init_checkpoint"] = str(_tiny_checkpoint(tmp_path / "stage2.pt", bn_pretrain=True))
    _compare(load(TrainConfig, _distill_dict(pair_dir, stage1, stage, **over)), monkeypatch)
