"""Memory and precision levers for GPUs: activation checkpointing (train.activation_checkpointing), fp16 with a
gradient scaler, TF32 matmuls, and the peak memory of the first steps."""
import copy
import json
import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from shared import runtime as runtime_lib
from shared.errors import ConfigError
from shared.nn import enable_activation_checkpointing
from shared.train.backends import OptimConfig
from shared.train.loop import LoopConfig, log_peak_memory, train
from stage1_tokenizer.dit_decoder import DiTDecoder
from stage1_tokenizer.train import train_tokenizer
from stage1_tokenizer.unet import ADMUNet
from stage2_ldm.dit import build_dit
from tests.helpers import ToyRegression, load_config


def dit():
    cfg = load_config(["ldm=dit_tiny"]).ldm
    return build_dit(cfg, in_channels=4, input_size=8, num_classes=10), (
        torch.randn(4, 4, 8, 8), torch.rand(4) * 1000, torch.arange(4))


def adm_unet():  # dropout: the recomputation must replay the same masks
    unet = ADMUNet(condition_channels=2, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                   attention_levels=(2,), head_channels=8, dropout=0.3)
    return unet, (torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 2, 4, 4))


def dit_decoder():
    decoder = DiTDecoder(condition_channels=4, patch_size=4, hidden_size=32, depth=2, num_heads=2)
    return decoder, (torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 4, 4, 4))


def forward_backward(network, inputs):
    """(output, gradients, tensors saved for backward by the forward pass) of one training step, seeded."""
    saved = []
    torch.manual_seed(3)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        output = network(*inputs)
    output.square().mean().backward()
    return output.detach(), [p.grad.clone() for p in network.parameters()], sum(saved)


@pytest.mark.parametrize("make", [dit, adm_unet, dit_decoder], ids=["dit", "adm_unet", "dit_decoder"])
def test_activation_checkpointing_keeps_values_and_gradients_and_keeps_fewer_activations(make, one_thread):
    torch.manual_seed(0)
    plain, inputs = make()
    for parameter in plain.parameters():  # leave the zero initialisation so that every path has a gradient
        nn.init.normal_(parameter, std=0.05)
    checkpointed = copy.deepcopy(plain)
    assert enable_activation_checkpointing(checkpointed) == 1
    output, gradients, kept = forward_backward(plain.train(), inputs)
    checkpointed_output, checkpointed_gradients, checkpointed_kept = forward_backward(checkpointed.train(), inputs)
    torch.testing.assert_close(checkpointed_output, output, rtol=0, atol=0)
    for a, b in zip(checkpointed_gradients, gradients):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert checkpointed_kept < kept / 2


def test_activation_checkpointing_of_a_tokenizer_without_a_diffusion_decoder_is_one_error(tmp_path):
    cfg = load_config(["stage=tokenizer", "tokenizer=vae_tiny", "tokenizer.train.activation_checkpointing=true",
                       "data.resolution=32"], output_root=tmp_path)
    with pytest.raises(ConfigError, match="tokenizer.kind=vae has none"):
        train_tokenizer(cfg)


class Regression(ToyRegression):
    """Its loss is multiplied by `gain` for `loud_steps`: in fp16 the scaled gradients overflow there."""

    def __init__(self, gain=1.0, loud_steps=()):
        super().__init__(seed=0)
        self.gain, self.loud_steps = gain, set(loud_steps)

    def forward(self, batch, step, phase):
        loss = (self.net(batch["x"]).float() - batch["y"]).pow(2).mean()
        return loss * (self.gain if step in self.loud_steps else 1.0), {"mse": loss.detach()}


def batches(split, start_step):
    generator = torch.Generator().manual_seed(start_step)
    while True:
        x = torch.randn(split.per_rank, 5, generator=generator)
        yield {"x": x, "y": x.sum(1, keepdim=True)}


def test_fp16_trains_with_a_gradient_scaler_that_skips_overflowing_steps(tmp_path, one_thread):
    runtime = runtime_lib.setup(load_config(["stage=ldm", "name=fp16", "precision=fp16", "device=cpu"],
                                            output_root=tmp_path))
    assert runtime.autocast_dtype == torch.float16
    module = Regression(gain=1e4, loud_steps={5})
    loop = LoopConfig(steps=8, batch_size=8, log_every=1, ckpt_every=4, ema_decay=0.9,
                      optim={"model": OptimConfig(lr=1e-2)})
    before = copy.deepcopy(module.net)
    train(runtime, module, batches, loop, model_config={}, progress=False)
    rows = [json.loads(line) for line in (runtime.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 9))  # an overflow is no lost step
    assert all(row["nonfinite_steps"] == 0 for row in rows)
    # The first steps overflow until the scale fits (65536 halved each time); the loud step overflows again.
    assert rows[0]["overflow_steps"] >= 1 and rows[4]["overflow_steps"] == rows[2]["overflow_steps"]
    assert "model/grad_norm" in rows[4]
    loud, before_loud = rows[5], rows[4]
    assert loud["overflow_steps"] == before_loud["overflow_steps"] + 1 and "model/grad_norm" not in loud
    assert loud["loss_scale"] == before_loud["loss_scale"] / 2
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), module.net.parameters()))
    state = torch.load(runtime.run_dir / "checkpoints" / "step_000000008.pt", weights_only=True)
    assert state["backend"]["scaler"]["scale"] == rows[-1]["loss_scale"]  # a resumed run keeps its scale


def test_precision_names_and_tf32():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert runtime_lib.resolve_precision("fp16", cuda) is torch.float16
    assert runtime_lib.resolve_precision("auto", cuda) is torch.bfloat16
    assert runtime_lib.resolve_precision("auto", cpu) is None
    with pytest.raises(ConfigError, match="fp16"):
        runtime_lib.resolve_precision("half", cpu)
    was = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True  # torch's defaults
        runtime_lib.set_tf32(True, cpu)
        assert torch.backends.cuda.matmul.allow_tf32 is False  # nothing to do on the CPU
        runtime_lib.set_tf32(False, cpu)
        assert torch.backends.cudnn.allow_tf32 is True
        runtime_lib.set_tf32(False, cuda)  # fp32 means fp32: the convolutions too
        assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False
        runtime_lib.set_tf32(True, cuda)
        assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = was


def test_the_peak_memory_of_the_first_steps_is_logged_on_cuda(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 4 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * 2**30))
    log = logging.getLogger("peak-memory-test")
    with caplog.at_level(logging.INFO, logger="peak-memory-test"):
        log_peak_memory(SimpleNamespace(device=torch.device("cpu"), log=log), 3)
        assert caplog.messages == []
        log_peak_memory(SimpleNamespace(device=torch.device("cuda", 0), log=log), 3)
    assert caplog.messages == ["peak CUDA memory over the first 3 steps: 3.00 GiB allocated, 4.00 GiB reserved, "
                               "of 80.00 GiB"]
