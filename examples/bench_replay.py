"""Decode steps with and without the replay that skips Dynamo (``qcompiler/tools/replay.py``), in one process.

Compiles ``--model`` with ``--recipe`` once (``qcompiler.compile``, static cache of 514 positions, as ``qcompiler
bench generate``), then times a decode step both ways in turn, ``--repeats`` rounds, medians: "dynamo" records
nothing, so every step enters the ``torch.compile``-d forward through Dynamo (its guards and input fetches, and
qcompiler's per-call weight check); "replay" is the default, where steps after the first two call the graph
directly. A step's time is what ``qcompiler bench generate`` measures (``chat.generate_timed``: the time
from the first new token to the last over the steps between, greedy, after a random 128-token context).
Both ways give the same text (checked).

    python examples/bench_replay.py --model smollm2-135m --recipe w4a16-rtn
"""

import argparse
import statistics

import torch

import qcompiler
from qcompiler.tools import chat, models
from qcompiler.tools.timing import machine_name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--recipe", default="w4a16-rtn")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--new", type=int, default=64)
    args = parser.parse_args(argv)

    loaded = models.load_model(args.model)
    model = qcompiler.compile(loaded.model, args.recipe, max_cache_len=514)
    ctx = torch.randint(10, loaded.model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    forward = model.forward
    record = forward.recorder.record

    def through_dynamo(call, kwargs):
        return call(**kwargs), None

    def switch(way):
        def to_way():
            forward.recorder.record = record if way == "replay" else through_dynamo
            forward.replay = forward.recorded = None
        return to_way

    times = chat.alternate_decode_steps(model, loaded, ctx, {way: switch(way) for way in ("dynamo", "replay")},
                                        args.repeats, args.new)
    dynamo, replay = (statistics.median(times[way]) for way in ("dynamo", "replay"))
    print(f"{args.model} {args.recipe} on {machine_name()}, {torch.get_num_threads()} threads, medians of "
          f"{args.repeats}: decode step through Dynamo {dynamo:.2f} ms, replayed {replay:.2f} ms "
          f"({replay / dynamo:.2f}x); same text")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
