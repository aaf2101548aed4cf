"""DropIT layers (Chen et al., ICLR 2023, arXiv 2202.13808): exact where the paper says exact, the weight gradient
equal to the one of a hand-sparsified input, the in-place swap, the callback and the saved bytes.

The references are the plain torch layers run by autograd. They run the same kernels as the DropIT backward
(``mm`` in the same orientation, ``aten.convolution_backward``), so the comparisons are bitwise (``torch.equal``);
a change that made them only close would be a change in what is computed, worth a look.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_localsgd.dropit import (
    DropITCallback,
    DropITConv2d,
    DropITLinear,
    SavedTensorBytes,
    apply_dropit,
    dropit_layers,
    functional,
    keep_count,
    remove_dropit,
    saves_memory,
)


@pytest.fixture(autouse=True)
def _fresh_warnings():
    functional._WARNED.clear()  # the "saves nothing" warning is once per process; each test sees its own
    yield


def hand_sparsified(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """The top round((1 - gamma) numel) entries of x by magnitude over the whole tensor, zeros elsewhere."""
    k = max(1, round((1 - gamma) * x.numel()))
    flat = x.detach().reshape(-1)
    keep = flat.abs().topk(k).indices
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.view(x.shape)


def twins(plain: nn.Module, gamma: float) -> tuple[nn.Module, nn.Module]:
    """(DropIT copy, plain copy) with identical weights."""
    dropit = copy.deepcopy(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gammas that save nothing: warned, tested below
        apply_dropit(dropit, gamma)
    return dropit, plain


# ---------------------------------------------------------------------------------------------------- Linear
@pytest.mark.parametrize("shape", [(7, 16), (4, 5, 16), (16,), (2, 3, 4, 16)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gamma", [0.5, 0.9])
def test_linear_output_input_and_bias_grads_exact_weight_grad_from_the_sparsified_input(shape, dtype, gamma):
    torch.manual_seed(0)
    layer, plain = twins(nn.Linear(16, 8).to(dtype), gamma)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    x_plain = x.detach().clone().requires_grad_()
    grad = torch.randn(*shape[:-1], 8, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gamma=0.5 saves nothing: warned, tested below
        out = layer(x)
    out_plain = plain(x_plain)
    out.backward(grad)
    out_plain.backward(grad)
    assert torch.equal(out, out_plain)
    assert torch.equal(x.grad, x_plain.grad)
    assert torch.equal(layer.bias.grad, plain.bias.grad)
    assert not torch.equal(layer.weight.grad, plain.weight.grad)  # approximate: something was dropped

    reference = copy.deepcopy(plain)
    reference.zero_grad()
    reference(hand_sparsified(x, gamma)).backward(grad)
    assert torch.equal(layer.weight.grad, reference.weight.grad)


def test_linear_under_autocast_is_the_plain_layer_under_autocast_on_the_sparsified_cast_input():
    torch.manual_seed(0)
    layer, plain = twins(nn.Linear(64, 32), 0.9)
    x = torch.randn(16, 64, requires_grad=True)
    x_plain = x.detach().clone().requires_grad_()
    grad = torch.randn(16, 32, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_plain = layer(x), plain(x_plain)
    out.backward(grad)
    out_plain.backward(grad)
    assert out.dtype == torch.bfloat16 and torch.equal(out, out_plain)
    assert torch.equal(x.grad, x_plain.grad) and torch.equal(layer.bias.grad, plain.bias.grad)
    plain.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts first: what is sparsified is bf16
        out_ref = plain(hand_sparsified(x.to(torch.bfloat16), 0.9))
    out_ref.backward(grad)
    assert layer.weight.grad.dtype == torch.float32
    assert torch.equal(layer.weight.grad, plain.weight.grad)


# ---------------------------------------------------------------------------------------------------- Conv2d
def pad_as_torch(x: torch.Tensor, conv: nn.Conv2d) -> tuple[torch.Tensor, tuple[int, int]]:
    """The tensor torch's own conv runs its kernel on, and the symmetric padding left to the kernel: padding
    modes other than zeros pad explicitly (nn.Conv2d), "same" with an even kernel pads the odd pixel on the
    right/bottom explicitly (aten's _convolution_mode)."""
    kh, kw = conv.kernel_size
    if conv.padding_mode != "zeros":
        ph, pw = conv.padding
        return F.pad(x, (pw, pw, ph, ph), mode=conv.padding_mode), (0, 0)
    if conv.padding == "valid":
        return x, (0, 0)
    if conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, (kh, kw))]
        x = F.pad(x, (0, totals[1] % 2, 0, totals[0] % 2))
        return x, (totals[0] // 2, totals[1] // 2)
    return x, conv.padding


CONVS = {
    "plain": dict(),
    "stride": dict(stride=2, padding=1),
    "stride_hw": dict(stride=(1, 2)),
    "dilation": dict(dilation=2, padding=2),
    "groups": dict(groups=2, padding=1),
    "depthwise": dict(groups=4),
    "no_bias": dict(bias=False, padding=1),
    "same": dict(padding="same"),
    "same_dilated": dict(padding="same", dilation=(2, 1)),
    "valid": dict(padding="valid"),
    "reflect": dict(padding=1, padding_mode="reflect"),
    "replicate": dict(padding=(1, 2), padding_mode="replicate"),
    "circular": dict(padding=2, padding_mode="circular"),
}


@pytest.mark.parametrize("kernel", [3, 4])
@pytest.mark.parametrize("case", sorted(CONVS))
def test_conv2d_output_input_and_bias_grads_exact_weight_grad_from_the_sparsified_input(case, kernel):
    torch.manual_seed(0)
    layer, plain = twins(nn.Conv2d(4, 8, kernel, **CONVS[case]), 0.8)
    x = torch.randn(2, 4, 9, 10, requires_grad=True)
    x_plain = x.detach().clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "same" with an even kernel copies the input
        out, out_plain = layer(x), plain(x_plain)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_plain.backward(grad)
    assert torch.equal(out, out_plain)
    assert torch.equal(x.grad, x_plain.grad)
    assert plain.bias is None or torch.equal(layer.bias.grad, plain.bias.grad)

    padded, padding = pad_as_torch(x.detach(), plain)
    weight = plain.weight.detach().clone().requires_grad_()
    F.conv2d(hand_sparsified(padded, 0.8), weight, None, plain.stride, padding, plain.dilation, plain.groups).backward(
        grad
    )
    assert torch.equal(layer.weight.grad, weight.grad)
    assert not torch.equal(layer.weight.grad, plain.weight.grad)


def test_conv2d_unbatched_input_and_half_precision():
    torch.manual_seed(0)
    layer, plain = twins(nn.Conv2d(3, 5, 3, padding=1).to(torch.bfloat16), 0.9)
    x = torch.randn(3, 6, 6, dtype=torch.bfloat16)  # (C, H, W), as nn.Conv2d accepts
    out, out_plain = layer(x), plain(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_plain.backward(grad)
    assert out.shape == (5, 6, 6) and torch.equal(out, out_plain)
    assert torch.equal(layer.bias.grad, plain.bias.grad)
    plain.zero_grad()
    plain(hand_sparsified(x, 0.9)).backward(grad)
    assert torch.equal(layer.weight.grad, plain.weight.grad)


# ---------------------------------------------------------------------------------------------------- gamma
def test_keep_count_rounds_and_keeps_at_least_one():
    assert keep_count(10, 0.9) == 1  # (1 - 0.9) * 10 is 0.9999...: rounded, not truncated
    assert keep_count(10, 0.7) == 3
    assert keep_count(10, 0.999) == 1
    assert keep_count(10, 0.01) == 10
    assert keep_count(0, 0.5) == 0


def test_tiny_gamma_keeps_everything_so_the_weight_grad_is_exact_and_huge_gamma_keeps_one_entry():
    torch.manual_seed(0)
    x = torch.randn(5, 8)
    for gamma, kept in ((1e-6, 40), (1 - 1e-6, 1)):
        layer, plain = twins(nn.Linear(8, 3), gamma)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer(x).sum().backward()
        plain(hand_sparsified(x, gamma)).sum().backward()
        assert torch.equal(layer.weight.grad, plain.weight.grad)
        assert (hand_sparsified(x, gamma) != 0).sum() == kept
    assert torch.equal(hand_sparsified(x, 1e-6), x)  # so the first weight gradient above is the plain one


def test_empty_batch_and_no_grad_and_frozen_weights():
    layer, plain = twins(nn.Linear(8, 3), 0.9)
    x = torch.randn(0, 8, requires_grad=True)
    layer(x).sum().backward()
    assert torch.equal(layer.weight.grad, torch.zeros(3, 8))
    x = torch.randn(4, 8)
    with torch.no_grad():
        out = layer(x)
    assert out.grad_fn is None and torch.equal(out, plain(x).detach())
    layer.weight.requires_grad_(False)  # fine-tuning a frozen layer: no input is kept at all
    layer.bias.requires_grad_(False)
    x.requires_grad_()
    with SavedTensorBytes(layer) as saved:
        out = layer(x)
    out.sum().backward()
    assert saved.bytes == 0
    plain_x = x.detach().clone().requires_grad_()
    plain(plain_x).sum().backward()
    assert torch.equal(x.grad, plain_x.grad)


@pytest.mark.parametrize("gamma", [0, 1, -0.1, 1.5, float("nan"), True, "0.9", None])
def test_bad_gamma_is_refused_naming_it(gamma):
    with pytest.raises(ValueError, match="`gamma`"):
        DropITCallback(gamma=gamma)
    with pytest.raises(ValueError, match="`gamma`"):
        apply_dropit(nn.Linear(2, 2), gamma)
    with pytest.raises(ValueError, match="`gamma`"):
        DropITLinear(2, 2, gamma=gamma)


# ---------------------------------------------------------------------------------------------------- memory
@pytest.mark.parametrize(
    ("gamma", "dtype", "ratio"),
    [(0.9, torch.float32, 0.1 * 8 / 4), (0.7, torch.float32, 0.3 * 8 / 4), (0.9, torch.bfloat16, 0.1 * 6 / 2)],
)
def test_saved_bytes_are_kept_values_plus_int32_positions(gamma, dtype, ratio):
    torch.manual_seed(0)
    layer, plain = twins(nn.Conv2d(8, 8, 3, padding=1).to(dtype), gamma)
    x = torch.randn(4, 8, 16, 16, dtype=dtype)  # data: only the weight gradient needs the input
    with SavedTensorBytes(layer) as saved:
        layer(x)
    with SavedTensorBytes(plain) as dense:
        plain(x)
    assert dense.bytes == x.numel() * x.element_size()  # the input, the weight not counted
    k = round((1 - gamma) * x.numel())  # 8192 entries: 819 kept at 0.9, 2458 at 0.7
    assert saved.bytes == k * (x.element_size() + 4)
    assert saved.bytes / dense.bytes == pytest.approx(ratio, rel=1e-3)


def test_a_storage_saved_twice_counts_once_so_a_relu_keeps_the_next_layers_input_alive():
    """ReLU saves its output, which is the next layer's input: DropIT cannot free it (a finding, documented)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    x = torch.randn(8, 32)
    with SavedTensorBytes(model) as dense:
        model(x)
    apply_dropit(model, 0.9, skip=["0"])
    with SavedTensorBytes(model) as sparse:
        model(x)
    activation = 8 * 32 * 4
    assert dense.bytes == 2 * activation  # x (layer 0) and the ReLU output (ReLU and layer 2: once)
    assert sparse.bytes == dense.bytes + 26 * (4 + 4)  # layer 2's copy comes on top: 26 of 256 values, positions


def test_configurations_that_save_nothing_are_warned_about():
    assert not saves_memory(0.5, torch.float32) and saves_memory(0.51, torch.float32)
    assert not saves_memory(2 / 3, torch.bfloat16) and saves_memory(0.67, torch.float16)
    with pytest.warns(UserWarning, match=r"gamma=0.5 on torch.float32 inputs saves no memory.*gamma > 0.5"):
        apply_dropit(nn.Linear(4, 4), 0.5)
    with pytest.warns(UserWarning, match=r"torch.bfloat16 inputs saves no memory.*gamma > 0.667"):
        apply_dropit(nn.Linear(4, 4).to(torch.bfloat16), 0.6)
    layer = nn.Linear(4, 4)
    apply_dropit(layer, 0.65)  # float32: saves
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="bfloat16 inputs saves no memory"), autocast:  # the runtime dtype
        layer(torch.randn(2, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_dropit(nn.Linear(4, 4), 0.6)
        apply_dropit(nn.Linear(4, 4).to(torch.float16), 0.7)


# ---------------------------------------------------------------------------------------------------- swapping
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten())
        self.header = nn.Linear(4 * 36, 16)  # "head" must not skip it: names match whole, not by prefix
        self.head = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 2))
        self.attn = nn.MultiheadAttention(16, 2)  # out_proj is an nn.Linear subclass whose forward never runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.header(self.body(x)).unsqueeze(0)
        return self.head(self.attn(h, h, h)[0][0])


def test_swap_keeps_parameters_state_dict_hooks_and_optimizer_and_restores_the_classes():
    torch.manual_seed(0)
    net = Net()
    params = list(net.named_parameters())
    state = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    calls = []
    net.header.register_forward_hook(lambda *args: calls.append(1))

    swapped = apply_dropit(net, 0.7, skip=["head"])
    assert swapped == ["body.0", "header"] == dropit_layers(net)
    assert type(net.body[0]) is DropITConv2d and type(net.header) is DropITLinear
    assert type(net.head[0]) is nn.Linear and type(net.attn.out_proj) is not DropITLinear
    assert all(a is b for (_, a), (_, b) in zip(net.named_parameters(), params, strict=True))  # same objects
    assert all(a is b for a, b in zip(optimizer.param_groups[0]["params"], net.parameters()))
    assert net.state_dict().keys() == state.keys()
    net(torch.randn(3, 1, 6, 6)).sum().backward()
    optimizer.step()
    assert calls == [1]

    assert remove_dropit(net) == swapped
    assert type(net.body[0]) is nn.Conv2d and type(net.header) is nn.Linear
    assert not hasattr(net.header, "dropit_gamma")
    assert [(n, id(p)) for n, p in net.named_parameters()] == [(n, id(p)) for n, p in params]
    net.load_state_dict(state)  # the plain model loads what the DropIT one saved, and back
    net(torch.randn(3, 1, 6, 6))
    assert calls == [1, 1]


def test_skip_is_checked_and_applying_twice_is_refused():
    with pytest.raises(ValueError, match=r"`skip` names no module of Net: \['heads', 'body.7'\]"):
        apply_dropit(Net(), 0.7, skip=["head", "heads", "body.7"])
    with pytest.raises(ValueError, match=r"did you mean \['head'\]"):
        DropITCallback(0.7, skip="head")
    with pytest.raises(ValueError, match="non-empty module names"):
        DropITCallback(0.7, skip=[""])
    net = Net()
    assert apply_dropit(net, 0.7, skip=["body", "header", "head.2"]) == ["head.0"]
    with pytest.raises(ValueError, match=r"already applied to \['head.0'\]"):
        apply_dropit(net, 0.9)


def test_dropit_layers_built_directly():
    layer = DropITConv2d(2, 3, 3, gamma=0.75)
    assert "gamma=0.75" in repr(layer) and layer.dropit_gamma == 0.75
    assert DropITLinear(4, 2, bias=False, gamma=0.8)(torch.randn(3, 4)).shape == (3, 2)


# ---------------------------------------------------------------------------------------------------- compile
def _compile_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    apply_dropit(model, 0.7)
    return model


def _compare_compiled(backend: str) -> None:
    eager, model = _compile_model(), _compile_model()
    compiled = torch.compile(model, backend=backend, fullgraph=True)  # no graph break anywhere
    for batch in (8, 5, 6):  # a new batch size: one recompile, then dynamic shapes (k is symbolic)
        x = torch.randn(batch, 1, 8, 8)
        eager.zero_grad()
        model.zero_grad()
        out, out_eager = compiled(x), eager(x)
        out.sum().backward()
        out_eager.sum().backward()
        assert torch.equal(out, out_eager)
        for p, q in zip(model.parameters(), eager.parameters()):
            assert torch.equal(p.grad, q.grad)


def test_torch_compile_traces_the_autograd_functions_whole_and_matches_eager():
    _compare_compiled("aot_eager")  # dynamo + AOTAutograd, no code generation: seconds


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager():
    _compare_compiled("inductor")  # the default backend: C++ code generation, 10-30 s on 2 cores


# ---------------------------------------------------------------------------------------------------- callback
class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 16))
        self.head = nn.Linear(16, 3)
        self.seen: list[tuple[str, ...]] = []

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))

    def training_step(self, batch, batch_idx):
        self.seen.append(tuple(type(m).__name__ for m in (self.body[0], self.body[3], self.head)))
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(32, 1, 4, 4, generator=g), torch.arange(32) % 3), batch_size=8)


def fit(callbacks: list) -> Tiny:
    model = Tiny()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=4,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    return model


def test_callback_swaps_for_the_fit_and_restores_after_it():
    dropit = fit([DropITCallback(gamma=0.9, skip=["head"])])
    assert dropit.seen == [("DropITConv2d", "DropITLinear", "Linear")] * 4
    assert type(dropit.body[0]) is nn.Conv2d and type(dropit.body[3]) is nn.Linear
    dense = fit([])
    assert dense.seen == [("Conv2d", "Linear", "Linear")] * 4
    for p, q in zip(dropit.parameters(), dense.parameters(), strict=True):  # DropIT was really used
        assert not torch.equal(p, q)


def test_callback_refuses_a_skip_name_the_model_lacks():
    with pytest.raises(ValueError, match=r"`skip` names no module of Tiny: \['classifier'\]"):
        fit([DropITCallback(gamma=0.9, skip=["classifier"])])


def test_example_yaml_adds_the_callback(tmp_path):
    pytest.importorskip("sklearn")  # the examples' data ship with scikit-learn (a dev dependency)
    from lightning.pytorch.cli import LightningCLI

    from lightning_localsgd import LocalUpdateStrategy
    from lightning_localsgd.demos.digits import DigitsCNN, DigitsDataModule

    config = Path(__file__).parents[1] / "examples" / "dropit.yaml"
    args = ["--config", str(config), f"--trainer.default_root_dir={tmp_path}"]
    cli = LightningCLI(DigitsCNN, DigitsDataModule, run=False, args=args)
    assert isinstance(cli.trainer.strategy, LocalUpdateStrategy)  # as tests/test_strategy_config.py asks of examples
    (dropit,) = [c for c in cli.trainer.callbacks if isinstance(c, DropITCallback)]
    assert (dropit.gamma, dropit.skip) == (0.7, ("classifier.2",))
    assert apply_dropit(cli.model, dropit.gamma, dropit.skip) == ["features.0", "features.2", "classifier.0"]
