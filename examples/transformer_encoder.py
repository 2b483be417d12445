"""Train a Transformer encoder classifier (sequence 4k; --tiny: 9) on synthetic tokens, with and without bigkern from the same seed: matching loss curves, and the
throughput of each.

    python examples/transformer_encoder.py [--steps 300] [--device cuda] [--dtype bfloat16] [--tiny]
"""

from common import compare, parse_args

from bigkern.benchmark.models import workloads


def main():
    args = parse_args(__doc__)
    [workload] = [w for w in workloads("tiny" if args.tiny else "bench") if w.name == "transformer-encoder-4k"]
    compare(workload.name, workload.model, workload.make_batch, workload.loss, workload.batch, args)


if __name__ == "__main__":
    main()
