"""Tiny models for generation tests: softmax, augmented (small groups, random conv taps and α),
hybrid, elu; a byte-level tokenizer; mock target/draft models with known next tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

import linearize
from linearize import Decoder, ModelConfig

KINDS = ("softmax", "augmented", "hybrid", "elu")
GROUP = 4
CONV = 4


def tiny_model(
    kind: str, *, seed: int = 0, vocab_size: int = 128, layers: int = 2, head_dim: int = 16
) -> Decoder:
    """A float64 tiny model whose greedy output is not degenerate (weights std 0.2); 64 wide,
    in heads of ``head_dim`` (two query heads a key head)."""
    torch.manual_seed(seed)
    model = Decoder(
        ModelConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            num_layers=layers,
            num_heads=64 // head_dim,
            num_kv_heads=32 // head_dim,
            intermediate_size=128,
        )
    )
    if kind == "augmented":
        linearize.linearize(
            model, {"name": "augmented", "size": GROUP, "conv": "causal", "conv_size": CONV}
        )
    elif kind == "hybrid":
        options = {"name": "augmented", "size": GROUP, "conv": "causal", "conv_size": CONV}
        linearize.linearize(model, options, layers=list(range(1, layers)))
    elif kind == "elu":
        linearize.linearize(model, "elu")
    elif kind != "softmax":
        raise ValueError(kind)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and not name.endswith("conv"):
                p.normal_(0, 0.2)
            elif name.endswith("conv"):
                p.normal_(0, 0.3)
            elif name.endswith("alpha"):
                p.fill_(0.7)
    return model.double().eval()


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges: 2 specials + 256 byte symbols (258 ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<eos>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<bos>{{ m['content'] }}<eos>{% endfor %}"
        "{% if add_generation_prompt %}<bos>{% endif %}"
    )
    return tokenizer


def text_model(kind: str = "augmented", seed: int = 0) -> Decoder:
    """A tiny float32 model with the byte tokenizer attached (vocabulary 258)."""
    model = tiny_model(kind, seed=seed, vocab_size=258).float()
    model.tokenizer = byte_tokenizer()
    model.config.eos_token_id = 1
    return model


# --- mock models with a known next token ---------------------------------------------------------


@dataclass
class MockState:
    tokens: list[int] = field(default_factory=list)

    @property
    def pos(self) -> int:
        return len(self.tokens)


class MockModel:
    """A Decoder stand-in: the next token is ``rule(context)`` (logits: 10 on it, 0 elsewhere),
    or, when ``table`` is given, logits ``table[last token]`` (a Markov chain)."""

    def __init__(self, vocab_size: int, rule=None, table: torch.Tensor | None = None) -> None:
        self.rule, self.table = rule, table
        self.config = SimpleNamespace(
            vocab_size=vocab_size, hidden_size=vocab_size, max_position_embeddings=2**20
        )
        self.config.eos_token_id = None
        self.tokenizer = None
        self.device = torch.device("cpu")
        self.dtype = torch.float64
        self.calls = 0

    def logits(self, context: list[int]) -> torch.Tensor:
        if self.table is not None:
            return self.table[context[-1]].clone()
        out = torch.zeros(self.config.vocab_size, dtype=torch.float64)
        out[self.rule(context)] = 10.0
        return out

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def init_state(self, batch_size: int = 1) -> MockState:
        return MockState()

    def forward_hidden(self, input_ids, *, state=None, form="auto"):
        self.calls += 1
        tokens = list(state.tokens if state is not None else []) + input_ids[0].tolist()
        rows = [
            self.logits(tokens[: len(tokens) - len(input_ids[0]) + i + 1])
            for i in range(len(input_ids[0]))
        ]
        return torch.stack(rows)[None], MockState(tokens)

    def prefill(self, input_ids, *, state=None):
        hidden, state = self.forward_hidden(input_ids, state=state)
        return hidden[:, -1], state

    def __call__(self, input_ids, *, state=None, form="auto"):
        return self.forward_hidden(input_ids, state=state, form=form)

    def forward_tree(self, input_ids, tree, state):
        self.calls += 1
        ids = input_ids[0].tolist()
        rows = []
        for node in range(len(ids)):
            path = tree.path(node).tolist()
            rows.append(self.logits(state.tokens + [ids[i] for i in path]))
        logits = torch.stack(rows)[None]
        return logits, logits, ids

    def commit(self, state, drafts, path):
        return MockState(state.tokens + [drafts[i] for i in path.tolist()])
