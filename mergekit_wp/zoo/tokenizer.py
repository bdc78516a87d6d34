"""The zoo's byte-level BPE tokenizer (digits split one by one) with the chat template."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
# The zoo chat template (README, "The micro zoo"): user turn ->
# "### Instruction:\n{content}\n\n### Response:\n"; replies end with eos.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}### Instruction:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'assistant' %}"
    "### Response:\n{{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on `texts`; eos doubles as pad for the base family."""
    tok = Tokenizer(models.BPE())
    # Digits one by one, so every number is spelled with the same ten tokens. A newline is a
    # token of its own: a HumanEval prompt ends in "\n" and its body starts with the indent, so
    # the prompt's last token and the body's first must be the ones pretraining saw inside a
    # function (merged "\n   " tokens made every completion start at a boundary the base never
    # saw, which the code expert alone learned and a plain average lost).
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def with_pad_token(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """A copy with one added pad token (vocabulary + 1), as instruction models often ship."""
    import copy

    out = copy.deepcopy(tokenizer)
    out.add_special_tokens({"pad_token": PAD})
    return out
