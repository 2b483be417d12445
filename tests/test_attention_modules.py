"""bigkern.nn.MultiheadAttention / TransformerEncoderLayer / TransformerDecoderLayer against torch's
modules: same state_dict, same outputs and gradients (float64 reference, FlashAttention's rule)."""

import copy
from unittest import mock

import pytest
import torch

import bigkern
from bigkern import testing
from bigkern.nn import attention as nn_attention
from bigkern.testing import make_tensor
from conftest import DEVICE


def run_against_torch(torch_module, bigkern_class, inputs, kwargs, check_params=True):
    """torch_module in float64 (reference) and fp32 (torch's error), and the same weights in
    bigkern_class at fp32: compare outputs, input gradients and parameter gradients."""
    reference = copy.deepcopy(torch_module).double()
    same_dtype = copy.deepcopy(torch_module).float()
    mine = bigkern.patch(copy.deepcopy(torch_module).float())  # class swaps, attention children too
    assert type(mine) is bigkern_class
    mine.load_state_dict(same_dtype.state_dict())
    xs = [make_tensor(shape, torch.float32, DEVICE, requires_grad=True) for shape in inputs]
    xs64 = [testing.fp64_copy(x) for x in xs]
    xst = [testing.same_dtype_copy(x) for x in xs]

    def call(module, args):
        out = module(*args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    for module in (reference, same_dtype, mine):
        module.to(DEVICE if module is not reference else "cpu")
    with bigkern.record() as calls:
        out = call(mine, xs)
    assert any(op.startswith("sdpa") for op, _ in calls), f"bigkern's attention did not run: {calls}"
    out64 = call(reference, xs64)
    out_t = call(same_dtype, xst)
    results = [testing.compare(out, out64, out_t)]
    grad = make_tensor(out.shape, torch.float32, DEVICE)
    out.backward(grad)
    out64.backward(grad.double().cpu())
    out_t.backward(grad)
    for i, (x, x64, xt) in enumerate(zip(xs, xs64, xst)):
        results.append(testing.compare(x.grad, x64.grad, xt.grad, name=f"grad input {i}",
                                       factor=testing.GRADIENT_FACTOR))
    if check_params:
        params64 = dict(reference.named_parameters())
        params_t = dict(same_dtype.named_parameters())
        for name, p in mine.named_parameters():
            if p.grad is None:
                assert params64[name].grad is None, f"{name}: gradient missing"
                continue
            results.append(testing.compare(p.grad, params64[name].grad, params_t[name].grad, name=f"grad {name}",
                                           factor=testing.GRADIENT_FACTOR))
    for result in results:
        assert result.ok, str(result)


def bool_mask(*shape, p=0.3):
    mask = torch.rand(*shape, device=DEVICE) < p
    mask[..., 0] = False  # never a row with every key masked
    return mask


def float_mask(*shape):
    return torch.zeros(*shape, device=DEVICE).masked_fill(bool_mask(*shape), float("-inf"))


# (constructor kwargs, input shapes, call kwargs builder)
MHA_CASES = {
    "self-float-mask": (dict(embed_dim=16, num_heads=2), [(5, 2, 16)] * 3,
                        lambda: dict(attn_mask=float_mask(5, 5), need_weights=False)),
    "batch-first-kpm-bool-mask": (dict(embed_dim=16, num_heads=2, batch_first=True), [(2, 5, 16), (2, 7, 16), (2, 7, 16)],
                                  lambda: dict(key_padding_mask=bool_mask(2, 7), attn_mask=bool_mask(5, 7),
                                               need_weights=False)),
    "kdim-vdim-bias-kv-float-kpm": (dict(embed_dim=24, num_heads=3, kdim=12, vdim=20, add_bias_kv=True),
                                    [(5, 2, 24), (7, 2, 12), (7, 2, 20)],
                                    lambda: dict(key_padding_mask=float_mask(2, 7), need_weights=False)),
    "zero-attn-no-bias-3d-mask": (dict(embed_dim=16, num_heads=2, add_zero_attn=True, bias=False),
                                  [(5, 3, 16), (6, 3, 16), (6, 3, 16)],
                                  lambda: dict(attn_mask=bool_mask(3 * 2, 5, 6), need_weights=False)),
    "causal-hint": (dict(embed_dim=16, num_heads=4, batch_first=True), [(2, 9, 16)] * 3,
                    lambda: dict(attn_mask=torch.nn.Transformer.generate_square_subsequent_mask(9, device=DEVICE),
                                 is_causal=True, need_weights=False)),
    "causal-hint-with-kpm": (dict(embed_dim=16, num_heads=2), [(6, 2, 16)] * 3,
                             lambda: dict(attn_mask=torch.nn.Transformer.generate_square_subsequent_mask(6, device=DEVICE),
                                          is_causal=True, key_padding_mask=float_mask(2, 6), need_weights=False)),
    "unbatched": (dict(embed_dim=16, num_heads=2), [(5, 16), (7, 16), (7, 16)],
                  lambda: dict(key_padding_mask=bool_mask(7), need_weights=False)),
}


@pytest.mark.parametrize("name", list(MHA_CASES))
def test_multihead_attention_matches_torch(backend, name):
    ctor, shapes, call_kwargs = MHA_CASES[name]
    torch_module = torch.nn.MultiheadAttention(**ctor, device=DEVICE)
    run_against_torch(torch_module, bigkern.nn.MultiheadAttention, shapes, call_kwargs())


def test_need_weights_takes_torch_path_under_auto_and_raises_when_forced():
    module = bigkern.nn.MultiheadAttention(16, 2)
    reference = torch.nn.MultiheadAttention(16, 2)
    reference.load_state_dict(module.state_dict())
    x = make_tensor((5, 2, 16))
    with bigkern.record() as calls:
        out, weights = module(x, x, x)  # need_weights=True is torch's default
    assert calls == {("MultiheadAttention", "torch"): 1}
    expected, expected_weights = reference(x, x, x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(weights, expected_weights)
    for backend in ("triton", "cuda"):
        with bigkern.use_backend(backend), pytest.raises(bigkern.UnsupportedError, match="need_weights"):
            module(x, x, x)
    assert bigkern.explain(module, x, x, x).backend == "torch"
    assert bigkern.explain(module, x, x, x, need_weights=False).backend == "torch"  # CPU tensors under auto


def test_masks_that_are_not_tensors_raise_torchs_type_error():
    module, reference = bigkern.nn.MultiheadAttention(8, 2), torch.nn.MultiheadAttention(8, 2)
    x = make_tensor((3, 2, 8))
    for name in ("key_padding_mask", "attn_mask"):
        for value in ((1, 2), [[True] * 3] * 2):
            with pytest.raises(TypeError):
                reference(x, x, x, need_weights=False, **{name: value})
            with pytest.raises(TypeError, match=f"'{name}'"):
                module(x, x, x, need_weights=False, **{name: value})


def test_nested_input_runs_through_the_padded_batch():
    """A batch_first layer given a NestedTensor (torch's TransformerEncoder makes one of a padded batch
    and its padding mask in inference) runs bigkern's attention on the padded batch and mask; what
    it cannot map so (a src_mask with it, not batch_first) takes torch's path, or raises forced."""
    layer = bigkern.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True).eval()
    reference = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True).eval()
    reference.load_state_dict(layer.state_dict())
    nested = torch.nested.nested_tensor([make_tensor((3, 8)), make_tensor((5, 8))])
    with torch.no_grad():
        with bigkern.record() as calls:
            out = layer(nested)
        assert calls == {("sdpa_forward", "torch"): 1}
        assert out.is_nested
        for got, expected in zip(out.unbind(), reference(nested).unbind()):
            torch.testing.assert_close(got, expected)
        mask = torch.zeros(5, 5)
        for module in (reference, layer):  # torch's path refuses it too, in its own words
            with pytest.raises(AssertionError, match="NestedTensor"):
                module(nested, src_mask=mask)
        for backend in ("triton", "cuda"):
            with bigkern.use_backend(backend), pytest.raises(bigkern.UnsupportedError, match="NestedTensor"):
                layer(nested, src_mask=mask)


@pytest.mark.parametrize("backend_name", ["auto", "triton"])
def test_encoder_nesting_a_padded_batch_runs_bigkerns_attention(backend_name):
    """torch.nn.TransformerEncoder (enable_nested_tensor) nests a padded batch in eval + no_grad: the
    patched layers still run bigkern's attention, and the padded positions come out 0 as torch's."""
    torch_model = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(8, 2, 12, batch_first=True), 2).eval()
    model = bigkern.patch(copy.deepcopy(torch_model))
    x = make_tensor((3, 5, 8))
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] + [True] * 4])
    with torch.no_grad(), bigkern.use_backend(backend_name), bigkern.record() as calls:
        out = model(x, src_key_padding_mask=padding)
    served = "torch" if backend_name == "auto" and DEVICE == "cpu" else backend_name
    assert calls == {("sdpa_forward", served): 2}
    with torch.no_grad():
        expected = torch_model(x, src_key_padding_mask=padding)
    torch.testing.assert_close(out, expected)
    assert torch.equal(out[padding], torch.zeros_like(out[padding]))


def test_same_constructor_parameters_and_state_dict():
    for ctor in (dict(embed_dim=16, num_heads=2, kdim=8, vdim=4, add_bias_kv=True, bias=False),
                 dict(embed_dim=16, num_heads=4, batch_first=True, dropout=0.2)):
        torch.manual_seed(0)
        theirs = torch.nn.MultiheadAttention(**ctor)
        torch.manual_seed(0)
        mine = bigkern.nn.MultiheadAttention(**ctor)
        assert list(mine.state_dict()) == list(theirs.state_dict())
        for a, b in zip(mine.state_dict().values(), theirs.state_dict().values()):
            assert torch.equal(a, b)
    for torch_class, bigkern_class in ((torch.nn.TransformerEncoderLayer, bigkern.nn.TransformerEncoderLayer),
                                       (torch.nn.TransformerDecoderLayer, bigkern.nn.TransformerDecoderLayer)):
        torch.manual_seed(0)
        theirs = torch_class(16, 2, 32, norm_first=True, batch_first=True)
        torch.manual_seed(0)
        mine = bigkern_class(16, 2, 32, norm_first=True, batch_first=True)
        assert list(mine.state_dict()) == list(theirs.state_dict())
        assert isinstance(mine, torch_class) and bigkern.nn.DROP_INS[torch_class] is bigkern_class
    assert isinstance(bigkern.nn.TransformerEncoderLayer(16, 2).self_attn, bigkern.nn.MultiheadAttention)


ENCODER_CASES = {
    "post-norm-seq-first-causal": (dict(norm_first=False, batch_first=False), (9, 2, 16),
                                   lambda: dict(src_mask=torch.nn.Transformer.generate_square_subsequent_mask(9),
                                                is_causal=True)),
    "pre-norm-batch-first-kpm-gelu": (dict(norm_first=True, batch_first=True, activation="gelu"), (2, 7, 16),
                                      lambda: dict(src_key_padding_mask=bool_mask(2, 7))),
}


@pytest.mark.parametrize("name", list(ENCODER_CASES))
def test_transformer_encoder_layer_matches_torch(backend, name):
    ctor, shape, call_kwargs = ENCODER_CASES[name]
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, device=DEVICE, **ctor)
    kwargs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in call_kwargs().items()}
    run_against_torch(layer.eval(), bigkern.nn.TransformerEncoderLayer, [shape], kwargs)


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_decoder_layer_matches_torch(backend, norm_first):
    layer = torch.nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=norm_first,
                                             device=DEVICE)
    kwargs = dict(tgt_mask=torch.nn.Transformer.generate_square_subsequent_mask(6, device=DEVICE), tgt_is_causal=True,
                  memory_key_padding_mask=bool_mask(2, 9))
    run_against_torch(layer, bigkern.nn.TransformerDecoderLayer, [(2, 6, 16), (2, 9, 16)], kwargs)


def test_an_attention_child_left_torchs_runs_as_torchs():
    """patch(..., exclude=["*.self_attn"]): the layer is bigkern's, its attention child stays torch's
    and runs as torch's module -- its hooks fire, bigkern's attention does not run (it used to run
    the child through bigkern's forward, skipping the hooks)."""
    encoder = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0), 2,
                                          enable_nested_tensor=False).eval()
    x = make_tensor((5, 2, 16))
    expected = encoder(x)
    fired = []
    encoder.layers[0].self_attn.register_forward_hook(lambda m, i, o: fired.append(type(m)))
    for exclude in (["*.self_attn"], [torch.nn.MultiheadAttention], ["layers.0"]):
        bigkern.patch(encoder, exclude=exclude)
        layer_class = torch.nn.TransformerEncoderLayer if exclude == ["layers.0"] else nn_attention.TransformerEncoderLayer
        assert type(encoder.layers[0]) is layer_class and type(encoder.layers[0].self_attn) is torch.nn.MultiheadAttention
        fired.clear()
        with bigkern.record() as calls:
            out = encoder(x)
        assert fired == [torch.nn.MultiheadAttention]
        assert calls[("sdpa_forward", "torch")] + calls[("sdpa_forward", "triton")] == (0 if exclude[0] != "layers.0" else 1)
        torch.testing.assert_close(out, expected)
        bigkern.unpatch(encoder)
    bigkern.patch(encoder, include=[torch.nn.TransformerEncoderLayer])  # a layer includes its attention
    assert all(type(layer.self_attn) is nn_attention.MultiheadAttention for layer in encoder.layers)


@pytest.mark.parametrize("batch,length", [(0, 5), (2, 0)])
def test_empty_batch_or_sequence(batch, length):
    """An empty batch or sequence gives torch's empty output (a view with -1 failed on 0 elements)."""
    mha = torch.nn.MultiheadAttention(8, 2)
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    x = make_tensor((length, batch, 8))
    expected_mha, _ = mha(x, x, x, need_weights=False)
    with torch.no_grad():
        expected_layer = layer(x.transpose(0, 1))
    bigkern.patch(mha), bigkern.patch(layer)
    out, _ = mha(x, x, x, need_weights=False)
    assert out.shape == expected_mha.shape and layer(x.transpose(0, 1)).shape == expected_layer.shape


def test_patched_models_trace_with_torch_fx():
    """torch.fx keeps torch's attention modules whole; bigkern's are recorded as one call each, so a
    patched model traces (symbolic_trace, torchvision's feature extraction) and runs bigkern's."""
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = torch.nn.MultiheadAttention(16, 2, batch_first=True)
            self.encoder = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
            self.decoder = torch.nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True)

        def forward(self, x, memory):
            x = x + self.attention(x, x, x, need_weights=False)[0]
            return self.decoder(self.encoder(x), memory)

    model = bigkern.patch(Model().eval())
    x, memory = make_tensor((2, 5, 16)), make_tensor((2, 7, 16))
    expected = model(x, memory)
    traced = torch.fx.symbolic_trace(model)
    with bigkern.record() as calls:
        out = traced(x, memory)
    torch.testing.assert_close(out, expected)
    assert sum(n for (op, _), n in calls.items() if op == "sdpa_forward") == 4


def test_training_with_dropout_is_reproducible():
    layer = bigkern.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.3, batch_first=True).train()
    x = make_tensor((2, 7, 16))
    torch.manual_seed(3)
    first = layer(x)
    torch.manual_seed(3)
    again = layer(x)
    assert torch.equal(first, again)
    first.sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in layer.parameters())


def test_torch_compile_fullgraph_encoder():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16),
                                bigkern.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, norm_first=True))
    x = make_tensor((2, 7, 8))
    model.eval()
    expected = model(x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), expected)
    model.train()
    compiled(x).sum().backward()
    assert model[0].weight.grad is not None


@pytest.mark.parametrize("batch_first", [True, False])
def test_torch_compile_once_for_new_inputs_of_one_shape(batch_first):
    """A compiled layer fed a new tensor each step (a training loop) compiles once, as torch's."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    layer = bigkern.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first).eval()
    attention = bigkern.nn.MultiheadAttention(16, 2, batch_first=batch_first)
    counter = CompileCounter()
    layer_compiled = torch.compile(layer, backend=counter, fullgraph=True)
    attention_compiled = torch.compile(lambda x, y: attention(x, x, x, need_weights=False)[0] + attention(x, y, y)[0],
                                       backend=counter, fullgraph=True)
    for _ in range(3):
        layer_compiled(make_tensor((2, 5, 16)))
        attention_compiled(make_tensor((2, 5, 16)), make_tensor((2, 5, 16)))
    assert counter.frame_count == 2


def test_batch_first_self_attention_projects_once():
    """batch_first self-attention keeps query is key is value through the transpose, as torch does,
    so the input projection is one packed matmul (it was three)."""
    module = bigkern.nn.MultiheadAttention(16, 2, batch_first=True)
    x = make_tensor((2, 5, 16))
    with mock.patch("torch.nn.functional.linear", wraps=torch.nn.functional.linear) as linear:
        out, _ = module(x, x, x, need_weights=False)
    assert linear.call_count == 2  # the packed input projection and out_proj
    reference = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    reference.load_state_dict(module.state_dict())
    torch.testing.assert_close(out, reference(x, x, x, need_weights=False)[0])
