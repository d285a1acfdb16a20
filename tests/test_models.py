"""Models: Table 1 parameter counts, shapes, chunked == whole, bad input, Fig. 2 init."""

import pytest
import torch
import torch.nn.functional as F

from recstab.models import (RECURRENCES, RLSP, BidirectionalVideoModel, LoopCertificate, StreamingNotSupported,
                            build_model, count_parameters)

# Table 1 of the paper (64 channels, denoising); tolerance 2 %.
TABLE1 = {
    ("vdncnn", "frame"): 375e3, ("vresnet", "frame"): 375e3,
    ("vresnet", "feat"): 557e3, ("vdncnn", "feat"): 741e3,
    ("vdncnn", "rlsp"): 410e3, ("vresnet", "rlsp"): 410e3,
}


@pytest.mark.parametrize("backbone,recurrence", list(TABLE1))
def test_parameter_counts_match_table1(backbone, recurrence):
    n = count_parameters(build_model(backbone, recurrence, "denoise", channels=64))
    assert abs(n - TABLE1[backbone, recurrence]) / TABLE1[backbone, recurrence] < 0.02, n


def test_parameter_count_arithmetic():
    # head 3->64 (1 792) + 10 convs 64->64 (36 928 each) + tail 64->3 (1 731)
    assert count_parameters(build_model("vdncnn", "none", "denoise", 64)) == 1792 + 10 * 36928 + 1731
    # RLSP widens the head by 64 input channels: +64*64*9
    assert count_parameters(build_model("vresnet", "rlsp", "denoise", 64)) == 372803 + 36864


@pytest.mark.parametrize("task,scale", [("denoise", 1), ("sr2", 2)])
@pytest.mark.parametrize("recurrence", RECURRENCES)
@pytest.mark.parametrize("backbone", ["vdncnn", "vresnet"])
def test_output_shapes(backbone, recurrence, task, scale):
    model = build_model(backbone, recurrence, task, channels=8)
    x = torch.rand(2, 4, 3, 12, 16)
    y = model(x)
    assert y.shape == (2, 4, 3, 12 * scale, 16 * scale)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("task", ["denoise", "sr2"])
@pytest.mark.parametrize("recurrence", [r for r in RECURRENCES if not r.startswith("birlsp")])
@pytest.mark.parametrize("backbone", ["vdncnn", "vresnet"])
def test_chunked_equals_whole(backbone, recurrence, task):
    torch.manual_seed(0)
    model = build_model(backbone, recurrence, task, channels=8).eval()
    x = torch.rand(1, 9, 3, 10, 10)
    with torch.no_grad():
        whole = model(x)
        state, chunks = None, []
        for start, stop in [(0, 1), (1, 4), (4, 9)]:
            y, state = model.process(x[:, start:stop], state)
            chunks.append(y)
    torch.testing.assert_close(torch.cat(chunks, 1), whole, rtol=1e-5, atol=1e-5)


def test_multiframe_window_is_causal():
    model = build_model("vresnet", "mf3", "denoise", channels=8).eval()
    x = torch.rand(1, 6, 3, 8, 8)
    x2 = x.clone()
    x2[:, 4:] = torch.rand(1, 2, 3, 8, 8)  # change the future only
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, :4], model(x2)[:, :4])


def test_bidirectional_refuses_streaming_but_sees_the_future():
    model = build_model("vresnet", "birlsp", "denoise", channels=8).eval()
    assert not model.streamable
    x = torch.rand(1, 5, 3, 8, 8)
    with pytest.raises(StreamingNotSupported, match="bidirectional"):
        model.process(x)
    x2 = x.clone()
    x2[:, -1] = 0
    with torch.no_grad():
        assert not torch.allclose(model(x)[:, 0], model(x2)[:, 0])


def test_shift_is_feedforward_with_finite_memory():
    """Feature-shifting reaches back at most `depth` frames; feature-recurrence further."""
    torch.manual_seed(0)
    for recurrence, forgets in (("shift", True), ("feat", False)):
        model = build_model("vdncnn", recurrence, "denoise", channels=8, depth=3).eval()
        x = torch.rand(1, 8, 3, 16, 16)
        x2 = x.clone()
        x2[:, 0] = 1 - x2[:, 0]
        with torch.no_grad():
            same = torch.allclose(model(x)[:, -1], model(x2)[:, -1])
        assert same == forgets, recurrence


def test_dampening_zero_turns_recurrence_off():
    model = build_model("vresnet", "rlsp", "denoise", channels=8).eval()
    x = torch.rand(1, 4, 3, 8, 8)
    x2 = x.clone()
    x2[:, :3] = torch.rand(1, 3, 3, 8, 8)
    model.dampening = 0.0
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, -1], model(x2)[:, -1])
        model.dampening = 1.0
        assert not torch.allclose(model(x)[:, -1], model(x2)[:, -1])


def test_recurrent_convs_and_certificate_factors():
    """The certificate multiplies the per-conv bounds along the loop (here every kernel slice
    is given bound 1 or 0.5, so the products are exact arithmetic)."""
    unit = lambda weight: 1.0  # noqa: E731
    assert build_model("vresnet", "none", "denoise", 8).recurrent_convs() == []
    mf3 = build_model("vresnet", "mf3", "denoise", 8).loop_certificate(unit)
    assert mf3.bound == 0.0 and mf3.certified and "last 3 input frame" in mf3.norm
    shift = build_model("vresnet", "shift", "denoise", 8).loop_certificate(unit)
    assert shift.bound == 0.0 and "last 6 input frame" in shift.norm  # window 1 + 5 blocks
    feat = build_model("vdncnn", "feat", "denoise", 8)
    cert = feat.loop_certificate(unit)
    assert len(feat.recurrent_convs()) == 10 and "weighted" in cert.norm and len(cert.weights) == 10
    assert 1.0 < cert.bound <= 1.01 and not cert.certified  # self-loops 1: rho = 1.01
    rlsp = build_model("vresnet", "rlsp", "denoise", 8)
    assert len(rlsp.recurrent_convs()) == 11
    assert rlsp.loop_certificate(unit).bound == 2.0 ** 5  # head * (1 + 1*1)^5
    frame = build_model("vdncnn", "frame", "denoise", 8)
    half = lambda weight: 0.5  # noqa: E731
    assert frame.loop_certificate(half).bound == pytest.approx(0.5 ** 12)  # head, 10 blocks, tail
    frame.dampening = 0.5
    assert frame.loop_certificate(half).bound == pytest.approx(0.5 ** 13)


def test_he_init_makes_untrained_recurrent_models_diverge():
    """Fig. 2: on random input, untrained VResNet frame/feat/rlsp diverge; feedforward stays bounded."""
    torch.manual_seed(0)
    x = torch.rand(1, 40, 3, 24, 24)
    growth = {}
    for recurrence in ("none", "mf3", "shift", "feat", "frame", "rlsp"):
        torch.manual_seed(1)
        model = build_model("vresnet", recurrence, "denoise", channels=32).eval()
        with torch.no_grad():
            norms = model(x).flatten(2).norm(dim=2)[0]
        growth[recurrence] = float(norms[-5:].mean() / norms[5:10].mean()) if torch.isfinite(norms).all() else float("inf")
    for r in ("none", "mf3", "shift"):
        assert growth[r] < 2, growth
    for r in ("feat", "frame", "rlsp"):
        assert growth[r] > 10, growth


@pytest.mark.parametrize("kwargs,match", [
    (dict(backbone="unet"), "valid backbones: vdncnn, vresnet"),
    (dict(recurrence="lstm"), "valid: none, shift, feat, frame, rlsp, birlsp, mf<k>"),
    (dict(task="sr4"), "valid tasks: denoise, sr2"),
])
def test_unknown_names_list_the_valid_choices(kwargs, match):
    args = dict(backbone="vresnet", recurrence="feat", task="denoise", channels=8) | kwargs
    with pytest.raises(ValueError, match=match):
        build_model(**args)


def test_wrong_input_shape_is_refused():
    with pytest.raises(ValueError, match="B×T×3×H×W"):
        build_model("vresnet", "feat", "denoise", 8)(torch.rand(2, 3, 8, 8))


class AveragedRLSP(RLSP):
    """The README's example of a new connection: RLSP fed with a running average of the
    hidden features, m_t = (m_{t-1} + h_t) / 2."""

    name = "avgrlsp"

    def update(self, state, hidden, block_in, block_out, output):
        return {"hidden": 0.5 * (state["hidden"] + hidden)}

    def certificate(self, body, tail, conv_norm, dampening):
        chain = super().certificate(body, tail, conv_norm, dampening)  # h_t as a function of m_{t-1}
        return LoopCertificate(0.5 + 0.5 * chain.bound, chain.norm)


def test_a_new_connection_is_one_class():
    """A connection object plugs into build_model: it streams, and its certificate is its own."""
    torch.manual_seed(0)
    model = build_model("vdncnn", AveragedRLSP(), "denoise", channels=8, depth=2).eval()
    assert model.is_recurrent and model.recurrence == "avgrlsp" and len(model.recurrent_convs()) == 3
    x = torch.rand(1, 5, 3, 12, 12)
    with torch.no_grad():
        first, state = model.process(x[:, :2])
        rest, _ = model.process(x[:, 2:], state)
        torch.testing.assert_close(torch.cat([first, rest], 1), model(x))
    half = lambda weight: 0.5  # noqa: E731
    assert model.loop_certificate(half).bound == pytest.approx(0.5 + 0.5 * 0.5 ** 3)  # head, 2 blocks


def test_bidirectional_is_two_directions_whose_tails_form_the_papers_joined_tail():
    """y_t = x_t + T * [h_t^f, h_t^b] with T = [T_f, T_b] and one bias b_f + b_b; an earlier-layout
    checkpoint (body, body_backward, one tail over 2C channels) loads into the two directions."""
    torch.manual_seed(0)
    model = build_model("vresnet", "birlsp-mf3", "denoise", channels=8, depth=2).double().eval()
    assert isinstance(model, BidirectionalVideoModel) and model.recurrence == "birlsp-mf3"
    assert isinstance(model.causal.connection, RLSP) and model.causal.window == 3
    x = torch.rand(2, 5, 3, 12, 12, dtype=torch.float64)  # float64: the two sums are ordered differently
    hiddens = {}
    for name in ("causal", "anticausal"):
        getattr(model, name).tail.register_forward_hook(
            lambda m, inputs, out, name=name: hiddens.setdefault(name, []).append(inputs[0]))
    with torch.no_grad():
        y = model(x)
        joined = torch.cat([torch.stack(hiddens["causal"], 1), torch.stack(hiddens["anticausal"][::-1], 1)], 2)
        weight = torch.cat([model.causal.tail.weight, model.anticausal.tail.weight], 1)
        bias = model.causal.tail.bias + model.anticausal.tail.bias
        expected = x + F.conv2d(joined.flatten(0, 1), weight, bias, padding=1).unflatten(0, (2, 5))
    torch.testing.assert_close(y, expected)

    old = {k.replace("causal.body.", "body.", 1) if k.startswith("causal.") else
           k.replace("anticausal.body.", "body_backward.", 1): v
           for k, v in model.state_dict().items() if ".tail." not in k}
    old["tail.weight"], old["tail.bias"] = weight, bias
    torch.manual_seed(1)
    fresh = build_model("vresnet", "birlsp-mf3", "denoise", channels=8, depth=2).double().eval()
    fresh.load_state_dict(old)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y)
    model.dampening = 0.5
    assert model.causal.dampening == model.anticausal.dampening == 0.5 == model.dampening
    assert len(model.recurrent_convs()) == 2 * len(model.causal.recurrent_convs())
