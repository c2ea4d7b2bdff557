"""The reference prompts of the real-model tests (test_real_model, test_kv_cache, test_speculative):
raw text and chat messages, English, code, Chinese, and one prompt of 400+ tokens."""

from pathlib import Path

N_NEW = 48  # greedy tokens generated per prompt
# The first 2,000 characters of qwen_mlx/generate.py as of commit 4fa952b, kept as a file so that
# editing the package does not change the reference prompt (the tests' measured agreements are
# over these exact prompts).
LONG_CODE = (Path(__file__).parent / "data" / "long_code.txt").read_text(encoding="utf-8")
# (messages or raw text, use chat template)
PROMPTS = [
    ("The three laws of thermodynamics are", False),
    ([{"role": "user", "content": "Write a Python function that checks whether a number is prime."}], True),
    ("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", False),
    ([{"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
      {"role": "user", "content": "Why is the sky blue?"}], True),
    ([{"role": "user", "content": "用中文解释一下什么是递归，并给一个例子。"}], True),
    ([{"role": "user", "content": "Summarize what this code does:\n\n" + LONG_CODE}], True),
]


def prompt_ids(tokenizer, prompt, chat: bool) -> list:
    """Our tokenizer's ids of a reference prompt (the chat template with the generation prompt)."""
    if chat:
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))
    return list(tokenizer.encode(prompt, add_special_tokens=False))


def until_eos(tokens: list, eos) -> list:
    """`tokens` up to and including the first EOS (where stream_generate stops)."""
    eos = set(eos)
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i + 1]
    return list(tokens)
