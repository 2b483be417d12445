"""Train the example CNN (conv 3x3 32 -> relu -> maxpool -> conv 64 -> ... -> dense 10) on synthetic images, with and without bigkern from the same seed: matching loss curves, and the
throughput of each.

    python examples/cnn.py [--steps 300] [--device cuda] [--dtype bfloat16] [--tiny]
"""

from common import compare, parse_args

from bigkern.benchmark.models import workloads


def main():
    args = parse_args(__doc__)
    [workload] = [w for w in workloads("tiny" if args.tiny else "bench") if w.name == "example-cnn"]
    compare(workload.name, workload.model, workload.make_batch, workload.loss, workload.batch, args)


if __name__ == "__main__":
    main()
