"""Run by the vLLM environment's Python (see conftest.py): vLLM's greedy continuations of token-id prompts, served
together (continuous batching), as a JSON file. Arguments: the model directory, the prompts as a JSON list of id
lists, the number of new tokens, the output file."""

import json
import os
import sys
from pathlib import Path

# vLLM's CPU backend reserves most of the machine's free memory for the KV cache by default; 1 GiB is plenty here
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    directory, prompts, new_tokens, out = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    engine = LLM(model=directory, dtype="float32", enforce_eager=True, max_model_len=128, seed=0)
    sampling = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    outputs = engine.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], sampling, use_tqdm=False)
    out.write_text(json.dumps([list(output.outputs[0].token_ids) for output in outputs]))


if __name__ == "__main__":  # vLLM's engine core starts in a spawned process, which imports this module again
    main()
