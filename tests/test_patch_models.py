"""`bigkern.patch` on models users bring: torchvision's resnet18, a timm ViT, Hugging Face GPT-2 and
BERT built from configs (no weights). The patched model must give the unpatched model's outputs and
gradients by FlashAttention's rule against a float64 copy, with bigkern's kernels doing the work:
Triton is forced (the interpreter on CPU) and `bigkern.record()` must show its ops ran.

torchvision, timm and transformers are test dependencies (the Makefile installs them); a machine
without them (the bare GPU image) skips these tests.
"""

import copy

import pytest
import torch

import bigkern
from bigkern import dispatch
from bigkern.patch import patched_modules
from bigkern.testing import assert_close, make_tensor


def outputs_and_gradients(model, forward, cotangent):
    """forward(model) -> output; backward with `cotangent`; (output, {parameter name: grad})."""
    model.zero_grad(set_to_none=True)
    output = forward(model)
    output.backward(cotangent.to(output.dtype))
    return output.detach(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def linear_gradient_term_magnitudes(model, forward, cotangent):
    """{parameter name: magnitude} for each nn.Linear's weight and bias: the largest sum of |terms|
    its gradient adds up (bias: sum over tokens of |dY|; weight: |dY|^T |X|), from a run of `model`.

    Such a gradient rounds in proportion to its terms, not to its value, and some true values are
    zero: a key projection's bias shifts each query's logits by a constant, which softmax cancels,
    so its gradient is pure rounding in both torch and bigkern. The FA floor is measured at this
    magnitude (as test_torch_samples measures at the sample's), keeping the 3x factor."""
    sums, handles = {}, []

    def watch(name, module):
        def after_forward(_, inputs, output):
            x = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1])

            def on_gradient(grad):
                g = grad.detach().abs().reshape(-1, grad.shape[-1])
                sums[f"{name}.weight"] = sums.get(f"{name}.weight", 0) + g.t() @ x
                sums[f"{name}.bias"] = sums.get(f"{name}.bias", 0) + g.sum(0)
            if output.requires_grad:
                output.register_hook(on_gradient)
        handles.append(module.register_forward_hook(after_forward))

    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear:
            watch(name, module)
    try:
        outputs_and_gradients(model, forward, cotangent)
    finally:
        for handle in handles:
            handle.remove()
    return {name: total.max().item() for name, total in sums.items()}


def check_patched_model(model, forward, expected_ops, *, scoped_functional=False, include=None):
    """Patched (Triton forced) vs unpatched, both fp32, against the model in fp64.

    forward(model) must build its inputs in the model's dtype (fp64 for the reference) from
    tensors drawn once by the caller. Returns the record of which implementations served."""
    model = model.eval()
    reference_model = copy.deepcopy(model).double()
    patched = bigkern.patch(copy.deepcopy(model), include=include)
    huggingface_attention = getattr(getattr(patched, "config", None), "_attn_implementation", None)
    assert patched_modules(patched) or huggingface_attention == "bigkern", "nothing was patched: the test would prove nothing"

    with torch.no_grad():
        cotangent = make_tensor(tuple(forward(model).shape))
    torch_output, torch_grads = outputs_and_gradients(model, forward, cotangent)
    reference_output, reference_grads = outputs_and_gradients(reference_model, forward, cotangent.double())
    term_magnitudes = linear_gradient_term_magnitudes(reference_model, forward, cotangent.double())
    with bigkern.use_backend("triton"), bigkern.record() as calls:
        if scoped_functional:
            with bigkern.enable():
                output, grads = outputs_and_gradients(patched, forward, cotangent)
        else:
            output, grads = outputs_and_gradients(patched, forward, cotangent)

    for op in expected_ops:
        assert calls[(op, "triton")] > 0, f"{op} never ran on Triton: {dict(calls)}"
    assert not [key for key in calls if key[1] != "triton"], f"a non-Triton implementation served: {dict(calls)}"
    assert_close(output, reference_output, torch_output, name="output")
    assert grads.keys() == reference_grads.keys()
    for name in grads:
        if reference_grads[name] is None:  # unused by this forward (BERT's pooler, say)
            assert grads[name] is None, f"grad {name}: expected none"
            continue
        assert_close(grads[name], reference_grads[name], torch_grads[name], name=f"grad {name}", factor=3.0,
                     scale=term_magnitudes.get(name))
    return patched, calls


# ---------------------------------------------------------------------------------------------
# Vision

def test_torchvision_resnet18():
    """Every conv on a GPU; in the interpreter (where a 512-channel conv takes minutes) the stem and
    the first stage, the rest staying torch's."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    images = make_tensor((2, 3, 16, 16))
    include = ["conv1", "layer1.*"] if dispatch.triton_interpreter_enabled() else None
    patched, calls = check_patched_model(
        model, lambda m: m(images.to(next(m.parameters()).dtype)),
        ["conv2d", "conv2d_input_grad", "conv2d_weight_grad"], include=include)
    swapped = 5 if include else 20
    assert len(patched_modules(patched)) == swapped
    assert calls[("conv2d", "triton")] == swapped

    bigkern.unpatch(patched)
    assert not patched_modules(patched)
    assert all(type(m) is torch.nn.Conv2d for m in patched.modules() if isinstance(m, torch.nn.Conv2d))


def test_timm_vision_transformer_patched_and_scoped():
    """timm's attention calls F.scaled_dot_product_attention itself: `bigkern.enable()` routes it;
    the patch embedding is an nn.Conv2d that `patch` swaps."""
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
    assert all(block.attn.fused_attn for block in model.blocks), "timm would not call scaled_dot_product_attention"
    images = make_tensor((2, 3, 32, 32))
    check_patched_model(model, lambda m: m(images.to(next(m.parameters()).dtype)),
                        ["conv2d", "sdpa_forward", "sdpa_backward"], scoped_functional=True)


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers

def gpt2_model(**kwargs):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.AutoModelForCausalLM.from_config(config, **kwargs)


def test_huggingface_gpt2_patched():
    model = gpt2_model()
    tokens = torch.randint(0, 97, (2, 13))
    original = model.config._attn_implementation
    patched, _ = check_patched_model(model, lambda m: m(tokens).logits, ["sdpa_forward", "sdpa_backward"])
    assert patched.config._attn_implementation == "bigkern"
    bigkern.patch(patched)  # twice: still undone by one unpatch
    bigkern.unpatch(patched)
    assert patched.config._attn_implementation == original


def test_huggingface_model_testing_the_sdpa_name_stays_on_sdpa():
    """DeepSeek-V3.2 folds its sparse key selection into the mask only under the names "eager" and
    "sdpa"; under "bigkern" it passed the selection as `indices=`, which an SDPA drop-in cannot
    honour: the patched model attended to every key (logits off by 0.1). Such models stay on SDPA,
    with a warning, and compute what they computed; one built with attn_implementation="bigkern" keeps
    to the selection."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DeepseekV32Config"):
        pytest.skip("this transformers has no DeepSeek-V3.2")
    torch.manual_seed(0)
    config = transformers.DeepseekV32Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, v_head_dim=8, qk_nope_head_dim=8,
        index_topk=3, index_head_dim=8, index_n_heads=2, first_k_dense_replace=1, max_position_embeddings=64)
    model = transformers.DeepseekV32ForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    tokens = torch.randint(3, 90, (2, 10))
    with pytest.warns(UserWarning, match="leaves DeepseekV32ForCausalLM on transformers' SDPA"):
        patched = bigkern.patch(copy.deepcopy(model))
    assert patched.config._attn_implementation == "sdpa"
    # chosen by name instead, bigkern's attention gets the selection as indices= and must keep to it
    from bigkern.integrations import huggingface

    huggingface.register()
    chosen = copy.deepcopy(model)
    chosen.set_attn_implementation("bigkern")
    with torch.no_grad():
        torch.testing.assert_close(patched(tokens).logits, model(tokens).logits)
        torch.testing.assert_close(chosen(tokens).logits, model(tokens).logits)


def test_huggingface_patched_model_loaded_in_a_new_process(tmp_path):
    """A patched model saved whole (torch.save / pickle) says "bigkern" in its config; in a process
    where transformers has not heard of bigkern's attention, patching it again registers it (it
    raised KeyError: not a valid attention implementation), and unpatch still restores it."""
    model = bigkern.patch(gpt2_model().eval())  # (skips without transformers)
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    tokens = torch.randint(0, 97, (2, 5))
    expected = model(tokens).logits
    torch.save(model, tmp_path / "model.pt")
    for interface in (AttentionInterface, AttentionMaskInterface):  # a new process's registries
        interface._global_mapping.pop("bigkern", None)
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert loaded.config._attn_implementation == "bigkern"
    with bigkern.record() as calls:
        torch.testing.assert_close(bigkern.patch(loaded)(tokens).logits, expected)
    assert calls[("sdpa_forward", "torch")] > 0
    bigkern.unpatch(loaded)
    assert loaded.config._attn_implementation != "bigkern"


def test_huggingface_eager_model_keeps_its_attention():
    """Built with attn_implementation="eager" (for the attention weights, say), a model keeps it."""
    eager = gpt2_model(attn_implementation="eager").eval()
    patched = bigkern.patch(copy.deepcopy(eager))
    assert patched.config._attn_implementation == "eager"
    tokens = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        assert len(patched(tokens, output_attentions=True).attentions) == 2


@pytest.mark.parametrize("selection", [dict(exclude=["*.attn"]), dict(exclude=["transformer.h.0"]),
                                       dict(include=[torch.nn.Conv2d]), dict(include=["lm_head"]),
                                       dict(include=[]), dict(exclude=[""])])
def test_huggingface_attention_switch_follows_include_and_exclude(selection):
    """transformers switches attention per model, not per layer: a model whose attention modules
    include/exclude leave (any of them) stays on SDPA."""
    model = bigkern.patch(gpt2_model(), **selection)
    assert model.config._attn_implementation == "sdpa"
    with bigkern.record() as calls, torch.no_grad():
        model(torch.randint(0, 97, (1, 5)))
    assert not any(op.startswith("sdpa") for op, _ in calls)


def test_huggingface_attention_switch_when_include_covers_it():
    model = bigkern.patch(gpt2_model(), include=["transformer"], exclude=["*.mlp"])
    assert model.config._attn_implementation == "bigkern"


def test_huggingface_model_inside_a_users_module_is_switched():
    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = gpt2_model()
            self.head = torch.nn.Linear(97, 3)

        def forward(self, tokens):
            return self.head(self.backbone(tokens).logits)

    model = bigkern.patch(Classifier().eval())
    assert model.backbone.config._attn_implementation == "bigkern"
    with bigkern.use_backend("triton"), bigkern.record() as calls, torch.no_grad():
        model(torch.randint(0, 97, (2, 5)))
    assert calls[("sdpa_forward", "triton")] == 2
    bigkern.unpatch(model)
    assert model.backbone.config._attn_implementation == "sdpa"


def test_huggingface_composite_switches_only_its_sdpa_parts():
    """An encoder-decoder whose encoder runs eager attention (for its weights): the encoder keeps it,
    the SDPA decoder switches, and unpatch gives each back its own."""
    transformers = pytest.importorskip("transformers")
    encoder = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64)
    decoder = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, add_cross_attention=True,
                                      is_decoder=True)
    config = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    model = transformers.EncoderDecoderModel(config=config).eval()
    model.encoder.set_attn_implementation("eager")
    source, target = torch.randint(2, 97, (2, 7)), torch.randint(2, 97, (2, 5))
    bigkern.patch(model)
    assert model.encoder.config._attn_implementation == "eager"
    assert model.decoder.config._attn_implementation == "bigkern"
    with bigkern.use_backend("triton"), bigkern.record() as calls, torch.no_grad():
        out = model(input_ids=source, decoder_input_ids=target, output_attentions=True)
    assert len(out.encoder_attentions) == 2 and calls[("sdpa_forward", "triton")] == 4  # self + cross, 2 layers
    bigkern.unpatch(model)
    assert model.encoder.config._attn_implementation == "eager"
    assert model.decoder.config._attn_implementation == "sdpa"


def test_huggingface_bert_with_padding_patched():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    model = transformers.BertModel(config)
    tokens = torch.randint(0, 97, (3, 11))
    lengths = torch.tensor([11, 7, 1])
    padding = (torch.arange(11)[None, :] < lengths[:, None]).long()
    check_patched_model(model, lambda m: m(input_ids=tokens, attention_mask=padding).last_hidden_state,
                        ["sdpa_forward", "sdpa_backward"])


def test_huggingface_attn_implementation_bigkern():
    """After registration, `attn_implementation="bigkern"` selects bigkern without patching."""
    pytest.importorskip("transformers")
    from bigkern.integrations import huggingface

    assert huggingface.register()
    unpatched = gpt2_model().eval()
    selected = gpt2_model(attn_implementation="bigkern").eval()
    selected.load_state_dict(unpatched.state_dict())
    assert selected.config._attn_implementation == "bigkern"
    tokens = torch.randint(0, 97, (2, 9))
    with bigkern.use_backend("triton"), bigkern.record() as calls:
        logits = selected(tokens).logits
    assert calls[("sdpa_forward", "triton")] == 2
    with torch.no_grad():
        expected = copy.deepcopy(unpatched).double()(tokens).logits
        torch_logits = unpatched(tokens).logits
    assert_close(logits, expected, torch_logits)


def test_huggingface_attention_sinks_take_the_models_eager_attention():
    """gpt-oss passes its attention sinks (s_aux) to the attention function; the fused kernel does
    not compute them, so under auto such calls run the model's own eager attention (the model gives
    the eager model's outputs) and a forced backend raises UnsupportedError."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "GptOssConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no gpt-oss")
    config = transformers.GptOssConfig(
        vocab_size=61, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=2, num_experts_per_tok=1, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64)
    eager = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for parameter in eager.parameters():
            parameter.copy_(make_tensor(parameter.shape, scale=0.3))
    # gpt-oss does not run on SDPA in transformers: patch() leaves its attention alone ...
    assert bigkern.patch(copy.deepcopy(eager)).config._attn_implementation == "eager"
    # ... and when bigkern's is chosen anyway, the calls with sinks take the model's eager attention
    pytest.importorskip("bigkern.integrations.huggingface").register()
    patched = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="bigkern").eval()
    patched.load_state_dict(eager.state_dict())
    assert patched.config._attn_implementation == "bigkern"
    tokens = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        expected = eager(tokens).logits
        without_sinks = copy.deepcopy(eager)
        for layer in without_sinks.model.layers:
            layer.self_attn.sinks.fill_(-1e4)
        assert (without_sinks(tokens).logits - expected).abs().max() > 1e-2  # the sinks matter here
        torch.testing.assert_close(patched(tokens).logits, expected, rtol=1e-5, atol=1e-5)
        with bigkern.use_backend("triton"), pytest.raises(dispatch.UnsupportedError, match="s_aux"):
            patched(tokens)


def test_huggingface_t5_position_bias_patched():
    """T5 passes learned relative position biases (position_bias): they reach bigkern's kernel as
    one additive mask with the padding folded in, and their gradient flows back to the bias table."""
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(vocab_size=67, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2,
                                   num_heads=4, dropout_rate=0.0)
    model = transformers.T5ForConditionalGeneration(config)
    tokens, targets = torch.randint(1, 67, (2, 9)), torch.randint(1, 67, (2, 5))
    padding = torch.ones(2, 9, dtype=torch.long)
    padding[1, 6:] = 0
    check_patched_model(model, lambda m: m(input_ids=tokens, attention_mask=padding, decoder_input_ids=targets).logits,
                        ["sdpa_forward", "sdpa_backward"])
