"""Acceptance rules: exact accept counts with mock models of known agreement; rejection sampling
reproduces the target's distribution; typical acceptance; the registry."""

from __future__ import annotations

import pytest
import torch

from linearize import Tree
from linearize.generation import (
    AcceptanceOptions,
    GenerationConfig,
    Sampler,
    SamplingConfig,
    Verification,
    acceptance_rule,
    generate,
)
from linearize.generation.decode import PROPOSERS, Decoding
from tests.generation.conftest import MockModel

V = 50


def target_rule(context):
    return (context[-1] + 1) % V


AGREEMENT = {
    "always": target_rule,
    "never": lambda c: (c[-1] + 2) % V,
    # Disagrees whenever the context length is a multiple of 3.
    "sometimes": lambda c: (c[-1] + (2 if len(c) % 3 == 0 else 1)) % V,
}


def expected_accepts(agreement: str, prompt_len: int, gamma: int, new: int) -> list[int]:
    """Accepted drafts per step, derived from the rules independently of the decoder."""
    length, produced, out = prompt_len + 1, 1, []
    while produced < new:
        a = 0
        while a < gamma and (
            agreement == "always" or agreement == "sometimes" and (length + a) % 3 != 0
        ):
            a += 1
        out.append(a)
        length += a + 1
        produced += a + 1
    return out


@pytest.mark.parametrize("agreement", list(AGREEMENT))
@pytest.mark.parametrize("gamma", [1, 4])
def test_mock_draft_accept_counts(agreement, gamma):
    target, draft = MockModel(V, target_rule), MockModel(V, AGREEMENT[agreement])
    prompt, new = [3, 4, 5], 30
    config = GenerationConfig(max_new_tokens=new, speculative="draft", gamma=gamma)
    decoding = Decoding(target, config, PROPOSERS["draft"](target, config, None, draft))
    tokens = decoding.prefill(prompt)
    while len(tokens) < new:
        tokens += decoding.step()
    assert tokens[:new] == [(5 + i) % V for i in range(1, new + 1)]
    expected = expected_accepts(agreement, len(prompt), gamma, new)
    assert [n - 1 for n in decoding.emitted_per_pass] == expected
    assert decoding.passes == len(expected)
    # γ draft passes per step (root + γ − 1 drafts) and one prefill.
    assert decoding.proposer.passes == gamma * len(expected)
    assert draft.calls == 1 + gamma * len(expected)
    assert target.calls == 1 + len(expected)


def test_mock_generate_counts():
    target = MockModel(V, target_rule)
    config = GenerationConfig(max_new_tokens=21, speculative="draft", gamma=4)
    result = generate(target, [1, 2], config, draft=MockModel(V, target_rule))
    assert result.token_ids == [(2 + i) % V for i in range(1, 22)]
    assert result.forward_passes == 4 and result.mean_accepted == 5.0
    never = generate(target, [1, 2], config, draft=MockModel(V, AGREEMENT["never"]))
    assert never.token_ids == result.token_ids
    assert never.forward_passes == 20 and never.mean_accepted == 1.0


# --- exact rejection sampling -------------------------------------------------------------------


def _tv(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - probs).abs().sum())


P = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15], dtype=torch.float64)
Q = torch.tensor([0.4, 0.1, 0.1, 0.3, 0.1], dtype=torch.float64)
SAMPLES = 12_000


def test_rejection_multi_candidate_tree_is_exact():
    """Deterministic top-k candidates (Medusa): the first emitted token is distributed as p."""
    tree = Tree.from_parents([-1, 0, 0, 0])
    logits = P.log().expand(4, -1)
    sampler = Sampler(SamplingConfig(temperature=1.0, seed=0))
    rule, options = acceptance_rule("rejection"), AcceptanceOptions()
    counts = torch.zeros(5, dtype=torch.float64)
    for _ in range(SAMPLES):
        v = Verification(tree, [0, 2, 0, 4], logits, [], sampler)
        a = rule(v, options)
        counts[v.tokens[a.path[1]] if len(a.path) > 1 else a.next_token] += 1
    assert _tv(counts, P) < 0.02


def test_rejection_chain_joint_is_exact():
    """A sampled draft chain: the joint of the first two emitted tokens is p(x1) p(x2 | x1)."""
    table = torch.softmax(torch.randn(5, 5, dtype=torch.float64), -1)
    q2 = torch.softmax(torch.randn(5, dtype=torch.float64), -1)
    tree = Tree.from_parents([-1, 0, 1])
    sampler = Sampler(SamplingConfig(temperature=1.0, seed=1))
    draws = torch.Generator().manual_seed(2)
    rule, options = acceptance_rule("rejection"), AcceptanceOptions()
    counts = torch.zeros(5, 5, dtype=torch.float64)
    for _ in range(SAMPLES):
        d1 = int(torch.multinomial(Q, 1, generator=draws))
        d2 = int(torch.multinomial(q2, 1, generator=draws))
        logits = torch.stack([P, table[d1], table[d2]]).log()
        v = Verification(tree, [0, d1, d2], logits, [], sampler, [None, Q, q2])
        a = rule(v, options)
        emitted = [v.tokens[i] for i in a.path[1:]] + [a.next_token]
        if len(emitted) == 1:
            # The next step would sample x2 from p(· | x1) (exact by the same argument).
            emitted.append(sampler.sample(table[emitted[0]]))
        counts[emitted[0], emitted[1]] += 1
    joint = P[:, None] * table
    assert _tv(counts.flatten(), joint.flatten()) < 0.035


@pytest.mark.parametrize("mode", ["draft", "lookup"])
def test_speculative_sampling_reproduces_markov_chain(mode):
    """Generate a long sequence from a Markov-chain target with speculative rejection sampling:
    transition frequencies match the target's."""
    torch.manual_seed(0)
    vocab = 3
    table = torch.randn(vocab, vocab, dtype=torch.float64)
    target = MockModel(vocab, table=table)
    draft = MockModel(vocab, table=torch.randn(vocab, vocab, dtype=torch.float64))
    config = GenerationConfig(
        max_new_tokens=3000, temperature=1.0, seed=0, speculative=mode, gamma=3, stop_token_ids=[]
    )
    result = generate(target, [0], config, draft=draft)
    tokens = [0, *result.token_ids]
    assert result.mean_accepted > 1.2
    counts = torch.zeros(vocab, vocab, dtype=torch.float64)
    for a, b in zip(tokens, tokens[1:], strict=False):
        counts[a, b] += 1
    probs = torch.softmax(table, -1)
    for state in range(vocab):
        assert _tv(counts[state], probs[state]) < 0.06


# --- typical acceptance and the registry -----------------------------------------------------


def test_typical_thresholds():
    tree = Tree.from_parents([-1, 0, 1])
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    logits = probs.log().expand(3, -1)
    sampler = Sampler(SamplingConfig(temperature=1.0, seed=0))
    options = AcceptanceOptions(typical_threshold=0.09, typical_alpha=0.3)
    # 0.15 > min(0.09, 0.3 e^-H) is accepted, 0.05 is not.
    accepted = acceptance_rule("typical")(
        Verification(tree, [0, 2, 3], logits, [], sampler), options
    )
    assert accepted.path == [0, 1]
    deep = acceptance_rule("typical")(Verification(tree, [0, 1, 0], logits, [], sampler), options)
    assert deep.path == [0, 1, 2]


def test_typical_at_temperature_zero_is_greedy():
    target = MockModel(V, target_rule)
    config = GenerationConfig(max_new_tokens=12, speculative="draft", gamma=3, acceptance="typical")
    result = generate(target, [7], config, draft=MockModel(V, AGREEMENT["sometimes"]))
    assert result.token_ids == [(7 + i) % V for i in range(1, 13)]


def test_unknown_rule():
    with pytest.raises(ValueError, match="greedy.*typical.*rejection"):
        acceptance_rule("nucleus")
    with pytest.raises(ValueError, match="unknown acceptance rule 'nucleus'"):
        GenerationConfig(acceptance="nucleus").validate()
    with pytest.raises(ValueError, match="rejection"):
        GenerationConfig(acceptance="greedy", temperature=0.7).validate()
