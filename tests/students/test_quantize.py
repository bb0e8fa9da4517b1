"""Fake quantization of a student for quantization-aware training: the int8 grid of the shipped model, straight-through
gradients, the same parameters and keys, and BatchNorm frozen on demand."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from pand.students import build_student
from pand.students.quantize import (
    QuantConv2d,
    QuantLinear,
    fake_quantize_activation,
    fake_quantize_weight,
    prepare_qat,
    quantization_state,
)


def test_weights_round_to_int8_with_one_symmetric_scale_per_output_channel():
    w = torch.tensor([[0.5, -1.27, 0.01], [2.54, 0.0, -0.03]])
    q = fake_quantize_weight(w)
    # hand-computed: channel 0 scale 1.27 / 127 = 0.01, channel 1 scale 2.54 / 127 = 0.02
    torch.testing.assert_close(q, torch.tensor([[0.5, -1.27, 0.01], [2.54, 0.0, -0.04]]))
    conv = torch.randn(8, 3, 3, 3)
    levels = fake_quantize_weight(conv) / (conv.abs().amax(dim=(1, 2, 3), keepdim=True) / 127)
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
    assert levels.abs().max() <= 127 + 1e-4


def test_activations_round_to_256_levels_over_the_batch_range_with_zero_exact():
    x = torch.tensor([0.0, 0.3, 1.0, 2.55])  # scale 2.55 / 255 = 0.01, zero point 0
    torch.testing.assert_close(fake_quantize_activation(x), x)
    y = torch.tensor([-1.0, 0.0, 0.004, 1.55])  # range [-1, 1.55]: scale 0.01, zero point 100
    got = fake_quantize_activation(y)
    torch.testing.assert_close(got, torch.tensor([-1.0, 0.0, 0.0, 1.55]))
    positive = torch.rand(1000) + 1.0  # a range that excludes 0 is widened to include it
    assert fake_quantize_activation(positive).unique().numel() <= 256


def test_gradients_pass_the_rounding_unchanged():
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(5, 3, requires_grad=True)
    (fake_quantize_weight(w).sum() + fake_quantize_activation(x).sum()).backward()
    torch.testing.assert_close(w.grad, torch.ones_like(w))
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_prepare_keeps_the_parameters_and_the_keys_and_swaps_every_conv_and_linear():
    torch.manual_seed(0)
    student = build_student("mobilenet_v2", 5, pretrained=False, image_size=32)
    keys = list(student.state_dict())
    params = [id(p) for p in student.parameters()]
    convs = sum(type(m) is nn.Conv2d for m in student.modules()) + sum(type(m) is nn.Linear for m in student.modules())
    report = prepare_qat(student)
    assert list(student.state_dict()) == keys and [id(p) for p in student.parameters()] == params
    assert len(report.quantized) == convs == 53 and report.float_layers == []
    assert sum(isinstance(m, (QuantConv2d, QuantLinear)) for m in student.modules()) == convs
    assert quantization_state(student) is report.state
    plain = build_student("mobilenet_v2", 5, pretrained=False, image_size=32)
    plain.load_state_dict(student.state_dict())  # a QAT checkpoint loads into the plain student
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        for _ in range(5):  # BatchNorm statistics of real activations, or every image gives the same logits
            student.train()(x)
        plain.load_state_dict(student.state_dict())
        a, b = plain.eval()(x), student.eval()(x)
    assert not torch.equal(a, b)  # quantized in evaluation ...
    assert (a - b).abs().max() < 0.5 * a.abs().max()  # ... and close to the float model


def test_training_steps_run_in_float_until_the_state_says_quantized():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(6, 4))
    state = prepare_qat(layer).state
    x = torch.randn(3, 6)
    state.train_quantized = False
    torch.testing.assert_close(layer.train()(x), torch.nn.functional.linear(x, layer[0].weight, layer[0].bias))
    quantized = layer.eval()(x)  # evaluation is always quantized
    torch.testing.assert_close(quantized, torch.nn.functional.linear(
        fake_quantize_activation(x), fake_quantize_weight(layer[0].weight), layer[0].bias))
    state.train_quantized = True
    torch.testing.assert_close(layer.train()(x), quantized)


def test_frozen_batch_norm_normalises_with_its_running_statistics_and_keeps_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    state = prepare_qat(model).state
    x = torch.randn(8, 3, 6, 6) * 3 + 1
    model.train()(x)  # updates the running statistics
    moved = copy.deepcopy(model[1].state_dict())
    assert not torch.equal(moved["running_mean"], torch.zeros(4))
    state.freeze_batch_norm = True
    model.train()
    out = model(x)
    torch.testing.assert_close(model[1].state_dict()["running_mean"], moved["running_mean"])
    assert int(model[1].num_batches_tracked) == 1
    torch.testing.assert_close(out, model.eval()(x))


def test_the_grid_is_the_one_onnx_runtime_ships(tmp_path):
    """Fake-quantized unfolded weights, folded with BatchNorm afterwards, equal ONNX Runtime's int8 weights of the
    folded convolution: rounding with one symmetric scale per output channel commutes with BatchNorm folding."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    from pand.export_int8 import Calibration, quantize_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(6) * 2)  # negative scales too
        model[1].running_var.copy_(torch.rand(6) + 0.5)
        model[1].running_mean.copy_(torch.randn(6))
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["image"], output_names=["logits"])
    quantize_onnx(path, tmp_path / "m.int8.onnx", Calibration(lambda: iter([x.numpy()]), [len(x)]),
                  input_name="image")
    graph = onnx.load(str(tmp_path / "m.int8.onnx")).graph
    init = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    dq = next(n for n in graph.node if n.op_type == "DequantizeLinear" and init.get(n.input[0]) is not None
              and init[n.input[0]].ndim == 4)
    shipped = init[dq.input[0]].astype(np.float32) * init[dq.input[1]].reshape(-1, 1, 1, 1)
    bn = model[1]
    fold = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().reshape(-1, 1, 1, 1)
    ours = (fake_quantize_weight(model[0].weight) * fold).detach().numpy()
    np.testing.assert_allclose(ours, shipped, rtol=1e-5, atol=1e-6)
