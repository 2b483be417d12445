"""Benchmark cases for the LSTM: DeepBench-style single-layer shapes (bench/shapes.json "lstm").

Modes:
  inference        forward under no_grad (batch 1-4: latency-bound; W_hh is re-read every step
                   unless it stays on chip, which is what the persistent CUDA kernel is for);
  inference+graph  the same, each provider captured in a CUDA graph and replayed (launch overhead
                   removed for every provider alike; torch.compile uses mode="reduce-overhead");
  training         forward + backward (batch 16-128).
Providers, in the same run on the same weights and inputs: bigkern's triton and cuda backends
(forced), torch-eager = torch.nn.LSTM (cuDNN on a GPU), torch-compile = torch.compile of a
hand-written LSTM (per-step matmul + pointwise, which Inductor fuses).

Work counted: forward FLOPs = steps * 2 * batch * 4H * (input + H), training = 3x forward;
bytes (inference) = the weights once plus the input and output sequences.
"""

import torch

from bigkern.benchmark.harness import Case, Unavailable
from bigkern.benchmark.providers import bigkern_backends, compiled

GRAPH_MAX_BATCH = 4  # graph replay is where launch overhead matters: the latency-bound cases
# the check against cuDNN: the recurrence carries each step's rounding into the next (and back
# through time in training), so half types drift further apart than one op's roundings
TOLERANCE = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 0.1}


def handwritten_lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh):
    """The LSTM a user would write: one input GEMM, then per step a matmul and the gate math."""
    gates_x = torch.nn.functional.linear(x, w_ih, b_ih + b_hh)
    h, c, outputs = h0, c0, []
    for t in range(x.shape[0]):
        i, f, g, o = (gates_x[t] + h @ w_hh.t()).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outputs.append(h)
    return torch.stack(outputs), h, c


class _Inputs:
    """One shape's weights and inputs, shared by every provider of a case."""

    def __init__(self, hidden, batch, steps, input_size, dtype, device, training):
        torch.manual_seed(0)
        # in the mode a user runs it in: torch's LSTM passes it to cuDNN, whose training mode writes
        # a reserve for backward even under no_grad (slower than the inference mode eval() gives)
        self.torch_lstm = torch.nn.LSTM(input_size, hidden, device=device, dtype=dtype).train(training)
        self.x = torch.randn(steps, batch, input_size, device=device, dtype=dtype).requires_grad_(training)
        self.grad = torch.randn(steps, batch, hidden, device=device, dtype=dtype)
        self.h0 = torch.randn(1, batch, hidden, device=device, dtype=dtype)
        self.c0 = torch.randn(1, batch, hidden, device=device, dtype=dtype)
        self.training = training

    def bigkern_lstm(self):
        from bigkern.nn import rnn

        module = rnn.LSTM(self.torch_lstm.input_size, self.torch_lstm.hidden_size, device=self.x.device,
                          dtype=self.x.dtype)
        module.load_state_dict(self.torch_lstm.state_dict())
        return module.train(self.training)

    def weights(self):
        m = self.torch_lstm
        return m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0


def _timed(make_call, inputs_of, training, graph=False, wrap=None):
    """Provider thunk: build inputs once, return the function to time (forward, or forward then
    backward; with graph=True, one CUDA-graph replay of the forward), which returns what it computed
    (the output; in training, also the gradients of x and of the weights) for the check against the
    reference. make_call(inputs) gives (x -> output, the weights). `wrap` (a forced bigkern backend)
    covers the whole step, backward included."""
    wrap = wrap or (lambda fn: fn)

    def make():
        inputs = inputs_of()
        call, weights = make_call(inputs)
        if training:
            def step():
                inputs.x.grad = None
                for weight in weights:
                    weight.grad = None
                out = call(inputs.x)
                out.backward(inputs.grad)
                return out, inputs.x.grad, [weight.grad for weight in weights]
            return wrap(step)

        def forward():
            with torch.no_grad():
                return call(inputs.x)
        forward = wrap(forward)
        if not graph:
            return forward
        forward()  # compile / autotune / plan outside the capture
        torch.cuda.synchronize()
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            out = forward()

        def replay():
            cuda_graph.replay()
            return out
        return replay
    return make


def cases(shapes, device, dtypes, quick=False):
    entries = shapes["lstm"]
    for mode in ("inference", "inference+graph", "training"):
        training = mode == "training"
        graph = mode == "inference+graph"
        if graph and device != "cuda":
            continue
        for entry in entries["training" if training else "inference"]:
            hidden, batch, steps = entry["hidden"], entry["batch"], entry["steps"]
            input_size = entry.get("input", hidden)
            if graph and batch > GRAPH_MAX_BATCH:
                continue
            if quick and not entry.get("quick"):
                continue
            for dtype in dtypes:
                size = torch.finfo(dtype).bits // 8
                forward_flops = steps * 2 * batch * 4 * hidden * (input_size + hidden)
                weight_bytes = 4 * hidden * (input_size + hidden + 2) * size
                io_bytes = steps * batch * (input_size + hidden) * size
                params = dict(hidden=hidden, batch=batch, steps=steps, input=input_size)
                name = f"h{hidden} b{batch} t{steps}"
                shared = {}

                def inputs_of(hidden=hidden, batch=batch, steps=steps, input_size=input_size, dtype=dtype,
                              training=training, shared=shared):
                    if "inputs" not in shared:
                        shared["inputs"] = _Inputs(hidden, batch, steps, input_size, dtype, device, training)
                    return shared["inputs"]

                providers = {}
                def bigkern_call(inputs):
                    module = inputs.bigkern_lstm()
                    state = (inputs.h0, inputs.c0)
                    return (lambda x: module(x, state)[0]), list(module.parameters())
                for backend, wrap in bigkern_backends(("triton", "cuda")).items():
                    providers[f"bigkern-{backend}"] = _timed(bigkern_call, inputs_of, training, graph, wrap)

                def eager_call(inputs):
                    if device == "cuda" and not torch.backends.cudnn.is_available():
                        raise Unavailable("cuDNN is not available")
                    state = (inputs.h0, inputs.c0)
                    return (lambda x: inputs.torch_lstm(x, state)[0]), list(inputs.torch_lstm.parameters())
                providers["torch-eager"] = _timed(eager_call, inputs_of, training, graph)

                def compile_call(inputs, graph=graph):
                    fn = compiled(handwritten_lstm, mode="reduce-overhead" if graph else None)
                    weights = inputs.weights()
                    return (lambda x: fn(x, inputs.h0[0], inputs.c0[0], *weights)[0]), list(weights)
                # reduce-overhead already replays CUDA graphs: time it as it is, not inside another graph
                providers["torch-compile"] = _timed(compile_call, inputs_of, training, graph=False)

                yield Case("lstm", name, params, dtype, mode,
                           flops=float(forward_flops * (3 if training else 1)),
                           bytes=float(weight_bytes + io_bytes), providers=providers,
                           baselines=("torch-eager", "torch-compile"), references=("torch-eager",),
                           tolerance=TOLERANCE[dtype])


__all__ = ["cases", "handwritten_lstm"]
