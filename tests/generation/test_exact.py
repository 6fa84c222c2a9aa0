"""Exactness: greedy speculative decoding (Medusa, draft, lookup) ≡ greedy plain decoding token
for token; tree verification and commit ≡ feeding the path one token at a time."""

from __future__ import annotations

import json
import random

import pytest
import torch

from linearize import Tree
from linearize.generation import GenerationConfig, MedusaHeads, generate, truncated_draft
from linearize.generation.decode import Decoding
from linearize.generation.speculative import Proposal
from tests.generation.conftest import CONV, GROUP, tiny_model

NEW = 20
# Shorter than the conv history (CONV - 1 = 3 committed values), inside a group, past one.
PROMPTS = ([3], [5, 9], [7, 1, 4, 2, 8], [11, 2, 30, 4, 99, 6, 17, 8, 1, 3])


def plain(model, prompt, n=NEW) -> list[int]:
    return generate(model, prompt, GenerationConfig(max_new_tokens=n)).token_ids


def random_spec(rng: random.Random, nodes: int, depth: int, top_k: int) -> list[list[int]]:
    """A random prefix-closed tree spec of up to ``nodes - 1`` paths, ``depth`` deep."""
    paths: list[tuple[int, ...]] = []
    children: dict[tuple[int, ...], int] = {(): 0}
    while len(paths) < nodes - 1:
        parent = rng.choice([p for p in [(), *paths] if len(p) < depth and children[p] < top_k])
        path = (*parent, children[parent])
        children[parent] += 1
        children[path] = 0
        paths.append(path)
    return [list(p) for p in paths]


class OracleProposer:
    """Random trees in which one branch carries the true greedy continuation for a random
    number of steps: accepted paths of every length, crossing group boundaries."""

    kind = "oracle"
    passes = 0

    def __init__(self, reference: list[int], prompt_len: int, seed: int, vocab: int) -> None:
        self.reference, self.prompt_len = reference, prompt_len
        self.rng, self.vocab = random.Random(seed), vocab

    def start(self, prompt, hidden) -> None:
        pass

    def propose(self, root, history, sampler, setting) -> Proposal:
        n = self.rng.randint(1, 16)
        parents = [-1] + [self.rng.randrange(i) for i in range(1, n)]
        tokens = [root] + [self.rng.randrange(self.vocab) for _ in range(1, n)]
        tree = Tree.from_parents(parents)
        done = len(history) - self.prompt_len + 1
        path = tree.path(self.rng.randrange(n)).tolist()
        keep = self.rng.randint((len(path) - 1) // 2, len(path) - 1)
        for depth, node in enumerate(path[1 : keep + 1], start=1):
            if done + depth - 1 < len(self.reference):
                tokens[node] = self.reference[done + depth - 1]
        return Proposal(tree, tokens)

    def observe(self, proposal, acceptance, hidden) -> None:
        pass


@pytest.mark.parametrize("prompt", PROMPTS, ids=lambda p: f"prompt{len(p)}")
def test_oracle_trees_equal_plain(kind, prompt):
    model = tiny_model(kind)
    reference = plain(model, prompt, NEW + 12)
    config = GenerationConfig(max_new_tokens=NEW, speculative="lookup", gamma=1)
    proposer = OracleProposer(reference, len(prompt), seed=len(prompt), vocab=128)
    decoding = Decoding(model, config, proposer)
    tokens = decoding.prefill(prompt)
    while len(tokens) < NEW + 6:
        tokens += decoding.step()
    assert tokens[: NEW + 6] == reference[: NEW + 6]
    assert decoding.mean_accepted > 1.5  # the oracle's branches were really accepted


@pytest.mark.parametrize("seed", range(4))
def test_medusa_random_trees_equal_plain(kind, seed):
    model = tiny_model(kind)
    rng = random.Random(seed)
    heads = MedusaHeads.from_model(model, num_heads=5, shared_proj=seed % 2 == 1)
    with torch.no_grad():
        for head in heads.heads:
            head.blocks[0].linear.weight.normal_(0, 0.05)
    for prompt in PROMPTS[:: 1 + seed % 2]:
        spec = random_spec(rng, nodes=rng.choice([2, 5, 9, 17]), depth=5, top_k=4)
        config = GenerationConfig(max_new_tokens=NEW, speculative="medusa", tree=json.dumps(spec))
        result = generate(model, prompt, config, heads=heads)
        assert result.token_ids == plain(model, prompt)
        assert result.forward_passes <= NEW - 1


@pytest.mark.parametrize("draft_kind", ["self", "truncated", "other"])
def test_draft_equal_plain(kind, draft_kind):
    model = tiny_model(kind)
    draft = {
        "self": model,
        "truncated": truncated_draft(model, 1),
        "other": tiny_model("hybrid" if kind != "hybrid" else "softmax", seed=1),
    }[draft_kind]
    for gamma, prompt in zip((1, 3, 5, 2), PROMPTS, strict=True):
        config = GenerationConfig(max_new_tokens=NEW, speculative="draft", gamma=gamma)
        result = generate(model, prompt, config, draft=draft)
        assert result.token_ids == plain(model, prompt)
        if draft_kind == "self":
            # The target drafting for itself: every draft is accepted.
            assert result.mean_accepted == gamma + 1
            assert result.forward_passes == -(-(NEW - 1) // (gamma + 1))


def test_lookup_equal_plain(kind):
    model = tiny_model(kind)
    for gamma, prompt in zip((2, 4, 1, 3), PROMPTS, strict=True):
        config = GenerationConfig(max_new_tokens=NEW, speculative="lookup", gamma=gamma)
        assert generate(model, prompt, config).token_ids == plain(model, prompt)


def test_auto_plans_equal_plain(kind):
    model = tiny_model(kind)
    prompt = PROMPTS[2]
    heads = MedusaHeads.from_model(model)
    for config, options in (
        (GenerationConfig(max_new_tokens=NEW, speculative="medusa"), {"heads": heads}),
        (GenerationConfig(max_new_tokens=NEW, speculative="draft", draft_layers=1), {}),
        (GenerationConfig(max_new_tokens=NEW, speculative="lookup"), {}),
    ):
        result = generate(model, prompt, config, **options)
        assert result.token_ids == plain(model, prompt)
        assert result.plan is not None and result.plan["mode"] == config.speculative
        assert result.calibration is not None


# --- the tree pass and the commit, node by node -------------------------------------------------


def _state_tensors(state) -> list[torch.Tensor]:
    out = []
    for layer in state.layers:
        out += [t.clone() for t in layer.attn.kept() if torch.is_tensor(t)]
        out += [layer.attn.S.clone(), layer.attn.z.clone()] if hasattr(layer.attn, "S") else []
        out += [] if layer.conv is None else [layer.conv.clone()]
    return out


@pytest.mark.parametrize("prompt_len", [1, 3, 6, 7])
def test_tree_and_commit_equal_sequential(kind, prompt_len):
    model = tiny_model(kind)
    rng = random.Random(prompt_len)
    prompt = torch.tensor([[rng.randrange(128) for _ in range(prompt_len)]])
    parents = [-1] + [rng.randrange(i) for i in range(1, 14)]
    tree = Tree.from_parents(parents)
    ids = torch.tensor([[rng.randrange(128) for _ in parents]])
    with torch.no_grad():
        for node in range(len(parents)):
            _, state = model(prompt)
            logits, _, drafts = model.forward_tree(ids, tree, state)
            path = tree.path(node)
            committed = _state_tensors(model.commit(state, drafts, path))
            _, state = model(prompt)
            for token in ids[0, path].tolist():
                step_logits, state = model(torch.tensor([[token]]), state=state, form="recurrent")
            torch.testing.assert_close(logits[0, node], step_logits[0, -1], rtol=1e-9, atol=1e-9)
            assert state.pos == prompt_len + len(path)
            for a, b in zip(committed, _state_tensors(state), strict=True):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_trees_cross_group_boundaries():
    """A sanity check on the test set-up: the trees above do cross group boundaries."""
    assert max(len(p) for p in PROMPTS) + 6 > 2 * GROUP
    assert min(len(p) for p in PROMPTS) < CONV - 1
