"""Build ``qat_tiny.onnx``: a tiny CNN trained with PyTorch quantization-aware training (QAT), exported
with its fake-quant nodes as QuantizeLinear/DequantizeLinear, for ``tests/test_qoperator.py``.

This is how PyTorch QAT models reach ONNX: the weights are still float initializers that go through a
QuantizeLinear -> DequantizeLinear pair (per output channel), activations have QuantizeLinear ->
DequantizeLinear pairs, biases stay float. The ``qoperator`` pass must fold the weight quantization into
int8 initializers and lower the rest.

Needs torch (used only here, never by onnxq or its tests)::

    pip install torch==2.13.0    # CPU build is enough
    python tests/data/make_qat_fixture.py

The output is deterministic for a given torch version (fixed seeds, CPU).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.ao import quantization as tq

HERE = Path(__file__).resolve().parent


class TinyNet(nn.Module):
    """Conv-ReLU, depthwise Conv-ReLU, 1x1 Conv, residual Add, global pooling, Linear.

    No BatchNorm: a QAT ConvBn module exports as Conv -> Div -> BatchNormalization between the weight's
    fake quant and the output's, which no QOperator op expresses (fold BatchNorm before QAT export).
    ``pool_quant`` gives the Linear a quantized input: eager-mode QAT puts no fake quant after pooling,
    so without it the Linear would read a float tensor in the exported graph.
    """

    def __init__(self) -> None:
        super().__init__()
        self.quant = tq.QuantStub()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.relu2 = nn.ReLU()
        self.pw = nn.Conv2d(8, 8, 1)
        self.add = nn.quantized.FloatFunctional()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.pool_quant = tq.QuantStub()
        self.fc = nn.Linear(8, 4)
        self.dequant = tq.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        y = self.relu1(self.conv1(x))
        z = self.pw(self.relu2(self.dw(y)))
        y = self.add.add(y, z)
        y = self.pool_quant(torch.flatten(self.pool(y), 1))
        return self.dequant(self.fc(y))


def qat_qconfig() -> tq.QConfig:
    """uint8 activations over the full 0..255 range (ONNX QuantizeLinear's), int8 per-channel weights."""
    act = tq.FakeQuantize.with_args(observer=tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                                    dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    wt = tq.FakeQuantize.with_args(observer=tq.MovingAveragePerChannelMinMaxObserver, quant_min=-128, quant_max=127,
                                   dtype=torch.qint8, qscheme=torch.per_channel_symmetric, ch_axis=0)
    return tq.QConfig(activation=act, weight=wt)


def main() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    model.eval()
    tq.fuse_modules_qat(model.train(), [["conv1", "relu1"], ["dw", "relu2"]], inplace=True)
    model.qconfig = qat_qconfig()
    tq.prepare_qat(model, inplace=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(20):  # a few QAT steps on random data: observers and fake-quant ranges settle
        x = torch.randn(4, 3, 8, 8)
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.apply(tq.disable_observer)
    model.eval()
    out = HERE / "qat_tiny.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 8, 8),), str(out), opset_version=13, dynamo=False,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
