"""The benchmarks' text: a seeded context of ~N tokens (words a user might keep in notes) and a
question about it, distinct per seed, so clients' prompts share no prefix beyond the system
message.

    prompt = context_prompt(tokenizer, 1024, seed)   # "Here are my notes ..." of ~1024 tokens
    q = text_question(index, seed)
"""

from __future__ import annotations

import numpy as np

SYSTEM = "You are a helpful assistant."

WORDS = (
    "river stone window garden silver morning candle ladder orange pocket winter basket yellow "
    "thunder meadow bottle copper shadow forest marble harbor pepper lantern velvet island "
    "feather mirror saddle tunnel violet anchor blanket cherry desert engine falcon glacier "
    "hammer jacket kettle lemon magnet needle olive parrot quartz rabbit sandal tiger umbrella "
    "valley walnut yogurt zebra bridge castle dragon eagle fountain guitar helmet igloo jungle "
    "koala ladle mango napkin ocean pencil quilt rocket spider tomato unicorn volcano wizard "
    "apple button cotton dinner empire friend giant honey insect jelly kitten lizard monkey "
    "nickel orbit planet rainbow signal ticket vessel wagon crystal dolphin ember fabric"
).split()


def context_words(tokenizer, n_tokens: int, seed: int) -> str:
    """Seeded words whose text takes ~n_tokens tokens (distinct per seed)."""
    rng = np.random.default_rng(seed)
    pool = rng.choice(WORDS, size=max(8, 2 * n_tokens + 16)).tolist()
    n = max(1, n_tokens)
    for _ in range(3):  # words are 1-2 tokens each: calibrate the count on the real tokenizer
        got = len(tokenizer.encode(" ".join(pool[:n])))
        if got == n_tokens:
            break
        n = max(1, min(len(pool), round(n * n_tokens / max(got, 1))))
    return " ".join(pool[:n])


def context_prompt(tokenizer, n_tokens: int, seed: int) -> str:
    return f"Here are my notes, keep them in mind:\n{context_words(tokenizer, n_tokens, seed)}\nReply with OK."


def text_question(index: int, seed: int) -> str:
    word = WORDS[int(np.random.default_rng(seed + 7).integers(len(WORDS)))]
    return f"Question {index + 1}: which word in my notes comes right after the first '{word}'? Explain."
