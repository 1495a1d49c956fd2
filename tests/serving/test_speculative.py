"""Speculative decoding is exact: greedy token for token, sampling in distribution (chi-square tests).

Chi-square tests use a fixed seed and significance level 0.001: a correct implementation fails one
with probability 1e-3 per seed, and with the fixed seed the outcome is deterministic. The p-value is
Q(df/2, χ²/2), the regularized upper incomplete gamma function (torch.special.gammaincc).
"""

import copy

import pytest
import torch

from mlsys_ref.serving.drafters import ExitHead, ModelDrafter, NGramDrafter, distill_exit_head
from mlsys_ref.serving.generate import generate
from mlsys_ref.serving.model import Llama, LlamaConfig
from mlsys_ref.serving.speculative import (acceptance_rate, expected_tokens_per_step, speculative_generate,
                                           verify, verify_greedy)
from engine_helpers import one_thread  # noqa: F401 (autouse: this module runs on one intra-op thread)

SIGNIFICANCE = 1e-3


def chi_square_p_value(counts: torch.Tensor, probabilities: torch.Tensor) -> float:
    """Pearson's test of observed counts against expected probabilities (cells with p = 0 must be empty)."""
    total = counts.sum()
    assert counts[probabilities == 0].sum() == 0, "samples where the target has probability 0"
    expected = probabilities[probabilities > 0].double() * total
    statistic = ((counts[probabilities > 0].double() - expected) ** 2 / expected).sum()
    df = int((probabilities > 0).sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), statistic / 2))


# -- greedy: token for token -------------------------------------------------------------------------
PROMPT = [5, 17, 42, 3, 88, 13, 7, 5, 17, 42, 60]


@pytest.fixture(scope="module")
def models():
    # fp64, so that no near-tie in the argmax can differ between a 1-row and a (k+1)-row forward
    config = LlamaConfig.tiny()
    target = Llama.random(config, seed=0, std=0.3).double()
    noisy = Llama.random(config, seed=0, std=0.3).double()  # the target plus noise: a good drafter
    with torch.no_grad():
        for parameter in noisy.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(5)).double())
    small = Llama.random(LlamaConfig.tiny(num_layers=1, hidden_size=24, num_heads=2, num_kv_heads=1,
                                          intermediate_size=40), seed=9).double()
    expected = generate(target, PROMPT, 24, stop_token_ids=[])
    return target, {"random small": small, "noisy copy": noisy}, expected


@pytest.mark.parametrize("k", range(1, 9))
def test_greedy_is_target_greedy(models, k):
    target, drafts, expected = models
    drafters = {name: ModelDrafter(model) for name, model in drafts.items()}
    drafters["self-draft"] = ModelDrafter(target, num_layers=1)
    drafters["n-gram"] = NGramDrafter(target.config.vocab_size)
    histograms = {}
    for name, drafter in drafters.items():
        out, stats = speculative_generate(target, drafter, PROMPT, 24, k=k, stop_token_ids=[])
        assert out == expected, f"{name}, k={k}"
        assert stats.emitted == 24 and sum(stats.histogram) == stats.steps
        histograms[name] = stats.histogram
    assert sum(histograms["noisy copy"][1:]) >= 3  # steps accepting drafts (and rolling back the rest) happened


def test_greedy_stops_like_generate(models):
    target, drafts, _ = models
    free = generate(target, PROMPT, 20, stop_token_ids=[])
    stop = free[7]
    out, _ = speculative_generate(target, ModelDrafter(drafts["noisy copy"]), PROMPT, 20, k=5, stop_token_ids=[stop])
    assert out == generate(target, PROMPT, 20, stop_token_ids=[stop]) == free[: free.index(stop) + 1]
    assert speculative_generate(target, NGramDrafter(97), [3], 1, k=4)[0] == generate(target, [3], 1)


def test_drafter_cache_rolls_back(models):
    """After drafting on one context, drafting on a diverging one equals a fresh drafter's drafts."""
    _, drafts, _ = models
    used = ModelDrafter(drafts["noisy copy"])
    used.propose(PROMPT + [1, 2, 3], 4, temperature=1.0, generator=torch.Generator().manual_seed(0))
    context = PROMPT + [1, 9]
    tokens, q = used.propose(context, 3, temperature=1.0, generator=torch.Generator().manual_seed(1))
    fresh_tokens, fresh_q = ModelDrafter(drafts["noisy copy"]).propose(
        context, 3, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert tokens == fresh_tokens and torch.allclose(q, fresh_q, atol=1e-12)
    assert len(used.cache) == len(context) + 2  # x_3 is never fed


def test_distilled_exit_head():
    """The exit starts as plain truncation; a brief distillation lowers KL(target ‖ draft) on held-out text,
    and speculative decoding with it stays token-for-token exact."""
    config = LlamaConfig.tiny(num_layers=4)
    target = Llama.random(config, seed=0, std=0.3)
    g = torch.Generator().manual_seed(0)
    train, held_out = (torch.randint(0, 97, (n, 48), generator=g) for n in (12, 4))
    tokens = held_out.flatten()
    positions = torch.arange(48).repeat(4)
    from mlsys_ref.serving.model import dense_attend

    def kl(head):
        with torch.no_grad():
            hidden = target.hidden_states(tokens, positions, dense_attend(4, 48), num_layers=2)
            log_p = torch.log_softmax(target.forward_dense(held_out).flatten(0, 1), -1)
            return float(torch.nn.functional.kl_div(torch.log_softmax(head(hidden), -1), log_p, log_target=True,
                                                    reduction="batchmean"))

    untrained = ExitHead(target, 2)
    with torch.no_grad():
        truncated = target.forward_dense(held_out[:1], num_layers=2)[0]
        hidden = target.hidden_states(held_out[0], torch.arange(48), dense_attend(1, 48), num_layers=2)
        assert torch.allclose(untrained(hidden), truncated, atol=1e-5)
    head = distill_exit_head(target, 2, train.tolist(), steps=60, batch_size=128, lr=3e-3)
    before, after = kl(untrained), kl(head)
    assert after < 0.9 * before, (before, after)
    prompt = held_out[0, :10].tolist()
    expected = generate(target, prompt, 16, stop_token_ids=[])
    for k in (2, 5):
        out, _ = speculative_generate(target, ModelDrafter(target, 2, exit_head=head), prompt, 16, k=k, stop_token_ids=[])
        assert out == expected
    with pytest.raises(ValueError, match="distilled for layer"):
        ModelDrafter(target, 3, exit_head=head)


def test_ngram_lookup():
    drafter = NGramDrafter(100, max_ngram=3)
    assert drafter.lookup([1, 2, 3, 4, 5, 1, 2, 3], 2) == [4, 5]
    assert drafter.lookup([7, 1, 2, 9, 8, 1, 2], 3) == [9, 8, 1]  # bigram match
    assert drafter.lookup([1, 2, 3], 3) == []


# -- sampling: the target's distribution, exactly -----------------------------------------------------
def _tables(V=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(2 * torch.randn(k + 1, V, generator=g, dtype=torch.float64), -1)
    q = torch.softmax(2 * torch.randn(k, V, generator=g, dtype=torch.float64), -1)
    p[0, 0], q[-1, 1] = 0.0, 0.0  # a token the target never emits, one the drafter never proposes
    return p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)


def _sample_steps(p, q, B, seed):
    g = torch.Generator().manual_seed(seed)
    k = q.shape[0]
    draft = torch.stack([torch.multinomial(q[i], B, replacement=True, generator=g) for i in range(k)], dim=1)
    return draft, *verify(p.expand(B, -1, -1), q.expand(B, -1, -1), draft, g)


@pytest.mark.parametrize("one_hot_draft", [False, True])
def test_every_emitted_position_follows_p(one_hot_draft):
    """Token j of a step (reached when j-1 drafts were accepted) is distributed as p_j; 2·10⁵ steps."""
    p, q = _tables()
    if one_hot_draft:  # prompt-lookup drafts: q is a point mass
        q = torch.nn.functional.one_hot(torch.tensor([2, 0, 5]), 6).double()
    draft, n, t = _sample_steps(p, q, 200_000, seed=1)
    k, V = q.shape
    for j in range(k + 1):
        reached = n >= j
        token = torch.where(n[reached] > j, draft[reached, j] if j < k else t[reached], t[reached])
        counts = torch.bincount(token, minlength=V)
        assert chi_square_p_value(counts, p[j]) > SIGNIFICANCE, f"position {j + 1}"


def test_acceptance_rate_and_tokens_per_step():
    """Measured acceptance ≈ α = Σ min(p, q); mean tokens per step ≈ (1 − α^(k+1))/(1 − α) (5 standard errors)."""
    p1, q1 = _tables(k=1, seed=3)
    k, B = 4, 200_000
    p, q = p1[:1].repeat(k + 1, 1), q1[:1].repeat(k, 1)  # the same p, q at every position: i.i.d. acceptance
    alpha = float(acceptance_rate(p[0], q[0]))
    draft, n, t = _sample_steps(p, q, B, seed=2)
    first_accepted = (n >= 1).double()
    assert abs(first_accepted.mean() - alpha) < 5 * (alpha * (1 - alpha) / B) ** 0.5
    tokens = (n + 1).double()
    assert abs(tokens.mean() - expected_tokens_per_step(alpha, k)) < 5 * tokens.std() / B ** 0.5
    assert 0.2 < alpha < 0.9  # a non-trivial case


def test_three_token_continuations_of_a_tiny_model():
    """speculative_generate (temperature 1, k = 2: two drafts + bonus in the first step, then rollback) vs the
    exact joint p(a) p(b | a) p(c | a, b) of a vocab-3 target: 27 cells, 1500 samples."""
    V = 3
    config = LlamaConfig.tiny(vocab_size=V, bos_token_id=None, eos_token_id=None)
    target = Llama.random(config, seed=4, std=0.1)  # flat enough that all 27 cells expect >= 5 samples
    draft = Llama.random(LlamaConfig.tiny(vocab_size=V, num_layers=1, bos_token_id=None, eos_token_id=None), seed=6, std=0.1)
    prompt = [2, 1, 0, 1]
    with torch.no_grad():
        joint = torch.ones(1, dtype=torch.float64)
        for length in range(3):  # extend every prefix of `length` generated tokens by one
            prefixes = torch.tensor([_digits(i, length, V)
                                     for i in range(V ** length)], dtype=torch.long).view(V ** length, length)
            sequences = torch.cat([torch.tensor(prompt).expand(V ** length, -1), prefixes], dim=1)
            step = torch.softmax(target.forward_dense(sequences)[:, -1].double(), -1)  # [V^length, V]
            joint = (joint[:, None] * step).flatten()
    generator, drafter = torch.Generator().manual_seed(7), ModelDrafter(draft)
    counts = torch.zeros(V ** 3, dtype=torch.long)
    for _ in range(1500):
        (a, b, c), _ = speculative_generate(target, drafter, prompt, 3, k=2, temperature=1.0, generator=generator)
        counts[(a * V + b) * V + c] += 1
    assert float(joint.min()) * 1500 >= 5  # every cell expects enough samples for the chi-square approximation
    assert chi_square_p_value(counts, joint) > SIGNIFICANCE


def _digits(index: int, length: int, base: int) -> list[int]:
    return [(index // base ** (length - 1 - i)) % base for i in range(length)]


def test_verify_greedy_and_formulas():
    logits = torch.tensor([[[0.0, 5.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 9.0]]])
    assert [int(x) for x in verify_greedy(logits, torch.tensor([[1, 0]]))] == [2, 2]
    assert [int(x) for x in verify_greedy(logits, torch.tensor([[1, 2]]))] == [1, 0]
    assert expected_tokens_per_step(0.0, 5) == 1.0 and expected_tokens_per_step(1.0, 5) == 6.0
    assert expected_tokens_per_step(0.5, 2) == pytest.approx(1.75)


def test_bad_arguments(models):
    target, drafts, _ = models
    with pytest.raises(ValueError, match="k must"):
        speculative_generate(target, NGramDrafter(97), PROMPT, 5, k=0)
    with pytest.raises(ValueError, match="vocab"):
        speculative_generate(target, NGramDrafter(50), PROMPT, 5)
    with pytest.raises(ValueError, match="prompt_ids"):
        speculative_generate(target, NGramDrafter(97), [], 5)
    with pytest.raises(ValueError, match="num_layers"):
        ModelDrafter(target, num_layers=3)
    with pytest.raises(ValueError, match="expected p"):
        verify(torch.rand(1, 3, 5), torch.rand(1, 3, 5), torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.gpu
def test_cuda_greedy_and_sampling(models):
    target, drafts, expected = models
    target, noisy = copy.deepcopy(target).cuda(), copy.deepcopy(drafts["noisy copy"]).cuda()  # fixture stays on cpu
    for k in (1, 4, 8):
        out, _ = speculative_generate(target, ModelDrafter(noisy), PROMPT, 24, k=k, stop_token_ids=[])
        assert out == expected, f"k={k}"
    p, q = _tables()
    p, q, B = p.cuda(), q.cuda(), 200_000
    g = torch.Generator(device="cuda").manual_seed(1)
    draft = torch.stack([torch.multinomial(q[i], B, replacement=True, generator=g) for i in range(3)], dim=1)
    n, t = verify(p.expand(B, -1, -1), q.expand(B, -1, -1), draft, g)
    first = torch.where(n > 0, draft[:, 0], t)
    assert chi_square_p_value(torch.bincount(first, minlength=6).cpu(), p[0].cpu()) > SIGNIFICANCE
