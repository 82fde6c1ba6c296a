"""The plain side of benchmarks/eval_speed.py: batched greedy `generate` over the same prompts.

    python plain_generate.py SPEC.json RESULT.json"""

import json
import sys
import time

import torch

spec = json.load(open(sys.argv[1]))
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

tok = AutoTokenizer.from_pretrained(spec["model"])
tok.padding_side = "left"
model = AutoModelForCausalLM.from_pretrained(spec["model"]).eval()
texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
         for p in spec["prompts"]]
order = sorted(range(len(texts)), key=lambda i: len(tok(texts[i], add_special_tokens=False).input_ids))
out = [None] * len(texts)
t0 = time.perf_counter()
with torch.no_grad():
    for b in range(0, len(order), spec["batch_size"]):
        idx = order[b:b + spec["batch_size"]]
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(**enc, max_new_tokens=spec["max_new_tokens"], do_sample=False,
                             pad_token_id=tok.pad_token_id)
        for i, row in zip(idx, gen[:, enc.input_ids.shape[1]:]):
            out[i] = tok.decode(row, skip_special_tokens=True)
json.dump({"generate_seconds": time.perf_counter() - t0, "responses": out}, open(sys.argv[2], "w"))
