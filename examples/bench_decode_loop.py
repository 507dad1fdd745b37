"""Decode steps in Hugging Face's generation loop and in qcompiler's (``qcompiler/tools/decode_loop.py``), in one process.

Compiles ``--model`` with ``--recipe`` once (``qcompiler.compile``, static cache of 514 positions, as ``qcompiler
bench generate``), then times a decode step both ways in turn, ``--repeats`` rounds: "hugging face" runs Hugging
Face's own ``_sample`` (every step's inputs through its ``prepare_inputs_for_generation`` and
``_update_model_kwargs_for_generation``); "qcompiler" is the default loop, which builds the inputs of the steps after
the first two itself. A step's time is what ``qcompiler bench generate`` measures (``chat.generate_timed``, greedy,
after a random 128-token context). Prints the medians and the median of the rounds' ratios (the host's speed drifts
between rounds, less within one). Both ways give the same text (checked).

    python examples/bench_decode_loop.py --model smollm2-135m --recipe w4a16-rtn
"""

import argparse
import statistics

import torch

import qcompiler
from qcompiler.tools import chat, decode_loop, models
from qcompiler.tools.timing import machine_name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--recipe", default="w4a16-rtn")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--new", type=int, default=64)
    args = parser.parse_args(argv)

    loaded = models.load_model(args.model)
    model = qcompiler.compile(loaded.model, args.recipe, max_cache_len=514)
    ctx = torch.randint(10, loaded.model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    ours = decode_loop._unsupported

    def hugging_faces(*args):
        return "Hugging Face's loop (examples/bench_decode_loop.py)"

    def switch(way):
        def to_way():
            decode_loop._unsupported = ours if way == "qcompiler" else hugging_faces
        return to_way

    try:
        times = chat.alternate_decode_steps(model, loaded, ctx, {way: switch(way) for way in ("hugging face", "qcompiler")},
                                            args.repeats, args.new)
    finally:
        decode_loop._unsupported = ours
    theirs, mine = (statistics.median(times[way]) for way in times)
    ratio = statistics.median(b / a for a, b in zip(times["hugging face"], times["qcompiler"], strict=True))
    print(f"{args.model} {args.recipe} on {machine_name()}, {torch.get_num_threads()} threads, medians of "
          f"{args.repeats}: decode step in Hugging Face's loop {theirs:.2f} ms, in qcompiler's {mine:.2f} ms "
          f"(per-round ratio {ratio:.2f}x); same text")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
