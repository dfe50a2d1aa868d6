"""Scores and generates against a running edgeinfer server with lm-evaluation-harness's own
`local-completions` model, as `lm_eval --model local-completions` would (without the task
datasets, which need the Hugging Face Hub): it finds the server's tokenizer itself
(`/tokenizer_info`, `/tokenize`), sends loglikelihood requests (token ids, echo, logprobs)
and generations, and parses the replies with its own code.

Usage: python tests/python/lm_eval_client.py BASE_URL MODEL
Prints one JSON object with what it saw; exits non-zero on any failure.
"""
import json
import sys

from lm_eval.api.instance import Instance
from lm_eval.models.openai_completions import LocalCompletionsAPI

base, model = sys.argv[1], sys.argv[2]
lm = LocalCompletionsAPI(
    base_url=base + "/v1/completions", model=model, num_concurrent=2, batch_size=2,
    max_length=2048,
)
context = "The capital of France is"
pairs = [(context, " Paris"), (context, " banana"), ("Water is made of hydrogen and", " oxygen")]
scores = lm.loglikelihood(
    [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
    disable_tqdm=True,
)
generated = lm.generate_until(
    [Instance("generate_until", {}, (context, {"until": ["\n"], "max_gen_toks": 6}), 0)],
    disable_tqdm=True,
)
print(json.dumps({
    "tokenizer_backend": lm.tokenizer_backend,
    "eos_token_id": lm.eot_token_id,
    "context_ids": lm.tok_encode(context),
    "scores": [[float(lp), bool(greedy)] for lp, greedy in scores],
    "generated": generated,
}))
