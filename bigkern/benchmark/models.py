"""Small real models, shared by `examples/` and the end-to-end benchmark cases.

Each model is plain torch.nn (so `bigkern.patch` can swap its Conv2d / LSTM / attention layers),
with a factory giving (model, make_batch, loss_fn) at a size chosen by the caller.

End-to-end cases time a training step (forward, backward, SGD update) and an inference forward of
each model four ways in the same run: eager, patched with bigkern, torch.compile, and patched +
torch.compile. Figures: milliseconds per step and samples per second; speedup vs eager and compile.
A --quick run leaves out the two compiled ways: compiling a whole model takes minutes per case.
"""

import copy
import dataclasses

import torch
from torch import nn

from bigkern.benchmark.harness import Case, Unavailable


class ExampleCNN(nn.Module):
    """conv 3x3 32 -> relu -> maxpool -> conv 64 -> relu -> maxpool -> conv 64 -> dense 64 -> dense 10."""

    def __init__(self, in_channels=3, image=32, classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3), nn.ReLU(),
        )
        side = ((image - 2) // 2 - 2) // 2 - 2
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * side * side, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class LSTMClassifier(nn.Module):
    """A 2-layer batch_first LSTM over embedded tokens, classifying from the last hidden state."""

    def __init__(self, vocab=1000, embed=128, hidden=256, layers=2, classes=10):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens):
        _, (h_n, _) = self.lstm(self.embed(tokens))
        return self.head(h_n[-1])


class TransformerClassifier(nn.Module):
    """A Transformer encoder (batch_first, pre-norm) over embedded tokens, mean-pooled."""

    def __init__(self, vocab=1000, d_model=256, heads=4, layers=2, ffn=1024, classes=10, causal=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, ffn, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)
        self.causal = causal

    def forward(self, tokens):
        x = self.embed(tokens)
        if self.causal:
            mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], device=tokens.device, dtype=x.dtype)
            x = self.encoder(x, mask=mask, is_causal=True)
        else:
            x = self.encoder(x)
        return self.head(x.mean(dim=1))


class DecoderLM(nn.Module):
    """A GPT-2-style decoder-only language model: causal pre-norm Transformer blocks, tied head."""

    def __init__(self, vocab=50257, d_model=768, heads=12, layers=12, seq=1024):
        super().__init__()
        self.tokens = nn.Embedding(vocab, d_model)
        self.positions = nn.Embedding(seq, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tokens):
        length = tokens.shape[1]
        x = self.tokens(tokens) + self.positions(torch.arange(length, device=tokens.device))
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device, dtype=x.dtype)
        x = self.norm(self.blocks(x, mask=mask, is_causal=True))
        return x @ self.tokens.weight.t()


@dataclasses.dataclass
class Workload:
    name: str
    model: nn.Module
    make_batch: object  # (device, dtype) -> (inputs, targets)
    loss: object  # (outputs, targets) -> scalar
    batch: int


def _classification(logits, targets):
    return nn.functional.cross_entropy(logits.float(), targets)


def _language_model(logits, targets):
    return nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def workloads(size="bench"):
    """The end-to-end models at benchmark size ("bench") or a size for CPU tests ("tiny")."""
    tiny = size == "tiny"

    def tokens(batch, length, vocab, classes=None):
        def make(device, dtype):
            x = torch.randint(0, vocab, (batch, length), device=device)
            y = torch.randint(0, classes, (batch,), device=device) if classes else torch.randint(
                0, vocab, (batch, length), device=device)
            return x, y
        return make

    def images(batch, side):
        def make(device, dtype):
            x = torch.randn(batch, 3, side, side, device=device, dtype=dtype).contiguous(
                memory_format=torch.channels_last)
            return x, torch.randint(0, 10, (batch,), device=device)
        return make

    found = [
        Workload("example-cnn", ExampleCNN(image=20 if tiny else 32), images(4 if tiny else 256, 20 if tiny else 32),
                 _classification, 4 if tiny else 256),
        Workload("lstm-classifier", LSTMClassifier(vocab=50, embed=8, hidden=16) if tiny else LSTMClassifier(),
                 tokens(3 if tiny else 64, 7 if tiny else 128, 50 if tiny else 1000, 10), _classification,
                 3 if tiny else 64),
        Workload("transformer-encoder-4k",
                 TransformerClassifier(vocab=50, d_model=16, heads=2, ffn=32) if tiny else
                 TransformerClassifier(d_model=512, heads=8, layers=4, ffn=2048),
                 tokens(2 if tiny else 4, 9 if tiny else 4096, 50 if tiny else 1000, 10), _classification,
                 2 if tiny else 4),
        Workload("gpt2-small-decoder",
                 DecoderLM(vocab=64, d_model=16, heads=2, layers=2, seq=16) if tiny else DecoderLM(),
                 tokens(2 if tiny else 8, 11 if tiny else 1024, 64 if tiny else 50257), _language_model,
                 2 if tiny else 8),
    ]
    try:
        import torchvision

        found.append(Workload("resnet18-tiny" if tiny else "resnet50", torchvision.models.resnet18(num_classes=10) if tiny else
                              torchvision.models.resnet50(), images(2 if tiny else 32, 32 if tiny else 224),
                              _classification, 2 if tiny else 32))
    except ImportError:
        pass
    return found


# a whole model's logits (or loss) against eager torch's: many layers of roundings apart in bf16
MODEL_TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 0.2}


def cases(shapes, device, dtypes, quick=False):
    """Training step and inference, eager / bigkern / compile / bigkern+compile (not with quick), per model."""
    import bigkern

    for workload in workloads("bench" if device == "cuda" else "tiny"):
        if quick and workload.name not in ("example-cnn", "transformer-encoder-4k"):
            continue
        for dtype in dtypes:
            for mode in ("training-step", "inference"):
                def provider(patched, compiled, workload=workload, dtype=dtype, mode=mode):
                    def make():
                        model = copy.deepcopy(workload.model).to(device)
                        if dtype != torch.float32:
                            model = model.to(dtype)
                        if patched:
                            bigkern.patch(model)
                        inputs, targets = workload.make_batch(device, dtype)
                        if compiled:  # a fresh compile: dynamo's recompile limit counts across cases
                            torch._dynamo.reset()
                        run = torch.compile(model) if compiled else model
                        if mode == "inference":
                            model.eval()

                            def infer():
                                with torch.no_grad():
                                    return run(inputs)
                            return infer
                        model.train()
                        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

                        def step():
                            optimizer.zero_grad(set_to_none=True)
                            loss = workload.loss(run(inputs), targets)
                            loss.backward()
                            optimizer.step()
                            return loss  # the first step's, from the same weights, is checked
                        return step
                    return make

                providers = {
                    "bigkern-patched": provider(True, False),
                    "bigkern-patched-compile": provider(True, True),
                    "torch-eager": provider(False, False),
                    "torch-compile": provider(False, True),
                }
                if quick:  # compiling a whole model takes minutes per case
                    providers = {name: make for name, make in providers.items() if not name.endswith("compile")}
                yield Case("models", workload.name, dict(batch=workload.batch), dtype, mode, flops=0.0, bytes=0.0,
                           providers=providers, baselines=("torch-eager", "torch-compile"), samples=workload.batch,
                           references=("torch-eager",), tolerance=MODEL_TOLERANCE[dtype])


__all__ = ["ExampleCNN", "LSTMClassifier", "TransformerClassifier", "DecoderLM", "workloads", "cases", "Unavailable"]
