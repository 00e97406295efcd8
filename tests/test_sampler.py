"""The sampler keeps exactly the right support, applies penalties as defined, and seeds reproduce."""

from __future__ import annotations

import math
import pickle
from typing import Any

import attrs
import pytest
import torch

from mini_vllm.engine import sampler
from mini_vllm.engine.sampler import GreedyArgmax, SamplingRow, apply_penalties, argmax_rows, derive_seed, sample
from mini_vllm.engine.sampling_params import SamplingParams


def row(params: SamplingParams, output: list[int] | None = None, prompt: list[int] | None = None,
        seed: int | None = None, blocked: tuple[int, ...] = ()) -> SamplingRow:
    return SamplingRow(params, prompt, output or [], blocked, seed)


def support(logits: torch.Tensor, params: SamplingParams, draws: int = 400) -> set[int]:
    gen = torch.Generator().manual_seed(0)
    batch = logits.unsqueeze(0).repeat(draws, 1)
    out = sample(batch, [row(params)] * draws, gen)
    return set(out.token_ids.tolist())


LOGITS = torch.log(torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04]))


@pytest.mark.timeout(60)
def test_top_k_keeps_k_most_likely() -> None:
    assert support(LOGITS, SamplingParams(temperature=1.0, top_k=2)) == {0, 1}


@pytest.mark.timeout(60)
def test_top_p_keeps_smallest_prefix_reaching_p() -> None:
    # 0.40 + 0.25 = 0.65 < 0.7, so the third token (0.15) is needed to reach 0.7.
    assert support(LOGITS, SamplingParams(temperature=1.0, top_p=0.7)) == {0, 1, 2}
    assert support(LOGITS, SamplingParams(temperature=1.0, top_p=0.65)) == {0, 1}
    assert support(LOGITS, SamplingParams(temperature=1.0, top_p=0.1)) == {0}


@pytest.mark.timeout(60)
def test_min_p_drops_tokens_below_fraction_of_max() -> None:
    # Threshold 0.3 * 0.40 = 0.12: keeps 0.40, 0.25, 0.15.
    assert support(LOGITS, SamplingParams(temperature=1.0, min_p=0.3)) == {0, 1, 2}


@pytest.mark.timeout(60)
def test_full_support_without_cuts() -> None:
    assert support(LOGITS, SamplingParams(temperature=1.0), draws=3000) == set(range(6))


@pytest.mark.timeout(60)
def test_sampling_follows_the_distribution() -> None:
    gen = torch.Generator().manual_seed(1)
    n = 20000
    out = sample(LOGITS.unsqueeze(0).repeat(n, 1), [row(SamplingParams(temperature=1.0))] * n, gen)
    freq = torch.bincount(out.token_ids, minlength=6).float() / n
    assert torch.allclose(freq, LOGITS.exp(), atol=0.015)


@pytest.mark.timeout(60)
def test_penalties_match_definitions() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    got = apply_penalties(logits, [row(params, output=[0, 0, 1], prompt=[2])])
    # token 0: seen, positive -> 2/2 = 1, then - 0.25*2 - 0.5 = 0.0
    # token 1: seen, negative -> -1*2 = -2, then - 0.25*1 - 0.5 = -2.75
    # token 2: in the prompt only: repetition applies (0.5/2), presence/frequency do not
    # token 3: unseen: unchanged
    assert got.tolist() == [[0.0, -2.75, 0.25, 3.0]]


@pytest.mark.timeout(60)
def test_greedy_applies_penalties_and_blocked_ids() -> None:
    logits = torch.tensor([[5.0, 4.0, 1.0]])
    out = sample(logits, [row(SamplingParams(temperature=0), blocked=(0,))], None)
    assert out.token_ids.tolist() == [1]
    out = sample(logits, [row(SamplingParams(temperature=0, frequency_penalty=2.0), output=[0])], None)
    assert out.token_ids.tolist() == [1]


@pytest.mark.timeout(60)
def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    seeded = row(SamplingParams(temperature=1.0), seed=derive_seed(42, 0, 3))
    alone = sample(logits[2:3], [seeded], torch.Generator().manual_seed(7)).token_ids.item()
    for g in range(5):
        rows = [row(SamplingParams(temperature=1.0))] * 5
        rows[2] = seeded
        got = sample(logits, rows, torch.Generator().manual_seed(g)).token_ids[2].item()
        assert got == alone


@pytest.mark.timeout(60)
def test_logprobs_are_raw_model_logprobs() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    out = sample(logits, [row(SamplingParams(temperature=0, logprobs=2, repetition_penalty=1.5), output=[2])], None)
    ref = torch.log_softmax(logits, -1)[0]
    assert out.top_ids is not None and out.top_logprobs is not None and out.logprobs is not None
    assert out.top_ids[0].tolist() == [2, 1]
    assert math.isclose(out.top_logprobs[0, 0].item(), ref[2].item(), rel_tol=1e-6)
    chosen = out.token_ids.item()
    assert math.isclose(out.logprobs[0].item(), ref[chosen].item(), rel_tol=1e-6)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("vocab", [259, 4096, 32000, 128256, 151936, 8 * 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_argmax_rows_is_torch_argmax_ties_nan_and_inf_included(vocab: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(vocab)
    rows = torch.randn(9, vocab, generator=gen).to(dtype)
    rows[1] = 0.0  # one value everywhere: index 0
    rows[2] = torch.randint(-2, 3, (vocab,), generator=gen).to(dtype)  # ties in many pieces
    rows[3] = float("-inf")
    rows[4, [vocab // 2 - 1, vocab // 2, vocab - 1]] = 50.0  # the maximum at the end of one piece and in others
    rows[5, [3, vocab - 2]] = float("nan")  # NaN counts as the largest, its first index wins
    rows[6, -1] = 1e4  # the very last index
    rows[7] = torch.where(torch.arange(vocab) % 7 == 0, 5.0, -5.0).to(dtype)
    rows[8, 0] = 1e4
    assert torch.equal(argmax_rows(rows), rows.argmax(dim=-1))
    assert torch.equal(argmax_rows(rows[:0]), rows[:0].argmax(dim=-1))


@pytest.mark.timeout(60)
def test_argmax_rows_cuts_a_row_into_the_largest_power_of_two_that_divides_it(monkeypatch: pytest.MonkeyPatch) -> None:
    shapes: list[tuple[int, ...]] = []
    real = torch.Tensor.reshape

    def spy(self: torch.Tensor, *shape: Any) -> torch.Tensor:
        shapes.append(tuple(shape))
        return real(self, *shape)

    monkeypatch.setattr(torch.Tensor, "reshape", spy)
    argmax_rows(torch.randn(2, 151936))  # 2^7 x 1187
    argmax_rows(torch.randn(2, 128256))  # 2^8 x 501
    argmax_rows(torch.randn(2, 259))  # odd: one pass
    assert shapes == [(2, 128, 1187), (2, 256, 501)]


@pytest.mark.timeout(60)
def test_greedy_argmax_takes_the_fastest_way_per_size_and_the_size_above_between_sizes() -> None:
    # Made-up times: two passes fastest at 1 and 2 rows (as the H200 showed for 128,256 logits), a
    # tie at 4 (the earlier way, one pass, keeps it), another way fastest at 16.
    calls: list[tuple[str, int]] = []

    def counting(name: str, way: Any) -> Any:
        def call(logits: torch.Tensor) -> torch.Tensor:
            calls.append((name, logits.shape[0]))
            return way(logits)

        return call

    other = counting("other", lambda x: x.argmax(dim=-1))
    times = {1: (26.0, 12.0, 30.0), 2: (26.0, 13.0, 30.0), 4: (20.0, 20.0, 20.0), 16: (21.0, 30.0, 9.0)}
    names = {sampler.one_pass_argmax: 0, sampler.argmax_rows: 1, other: 2}
    choice = GreedyArgmax.measured([1, 2, 4, 16], lambda n, way: times[n][names[way]], {"other": other})
    assert choice.choice == ("two passes", "two passes", "one pass", "other")
    assert choice.by_size() == {1: "two passes", 2: "two passes", 4: "one pass", 16: "other"}
    choice.ways["two passes"] = counting("two passes", argmax_rows)
    choice.ways["one pass"] = counting("one pass", sampler.one_pass_argmax)
    gen = torch.Generator().manual_seed(0)
    for rows in (1, 2, 3, 16, 40):
        logits = torch.randint(-3, 4, (rows, 4096), generator=gen).float()
        assert torch.equal(choice(logits), logits.argmax(dim=-1))
    # 3 rows take 4's choice, 40 the last size's.
    assert calls == [("two passes", 1), ("two passes", 2), ("one pass", 3), ("other", 16), ("other", 40)]
    assert torch.equal(GreedyArgmax.one_pass()(torch.ones(5, 4096)), torch.zeros(5, dtype=torch.int64))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sizes", [[], [0, 1], [2, 1], [1, 1]])
def test_greedy_argmax_refuses_sizes_that_are_not_ascending_positive_counts(sizes: list[int]) -> None:
    with pytest.raises(ValueError, match="ascending positive"):
        GreedyArgmax.measured(sizes, lambda n, way: 1.0)


@pytest.mark.parametrize(
    ("params", "blocked", "argmax_only"),
    [
        ({"temperature": 0}, (), True),
        ({"temperature": 0.7}, (), False),
        ({"temperature": 0, "logprobs": 1}, (), False),
        ({"temperature": 0}, (2,), False),  # EOS masked before min_tokens
        ({"temperature": 0, "repetition_penalty": 1.1}, (), False),
        ({"temperature": 0, "presence_penalty": 0.5}, (), False),
        ({"temperature": 0, "frequency_penalty": -0.5}, (), False),
    ],
)
def test_a_row_knows_once_whether_its_argmax_is_all_it_needs(params: dict[str, Any], blocked: tuple[int, ...],
                                                               argmax_only: bool) -> None:
    row = SamplingRow(SamplingParams(**params), None, [], blocked, None)
    assert row.argmax_only is argmax_only
    assert pickle.loads(pickle.dumps(row)).argmax_only is argmax_only  # as it travels to tensor-parallel workers
    assert attrs.evolve(row, blocked_token_ids=(7,)).argmax_only is False  # recomputed, not copied


@pytest.mark.gpu
@pytest.mark.timeout(120)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sampling_on_the_gpu_never_waits_for_it() -> None:
    """The GPU runner samples as it launches a step: a wait for the device there (a branch on a
    device tensor, a copy from pageable memory) would keep the CPU from preparing the next step
    while this one runs. torch's sync debug mode turns any such wait into an error."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(6, 1000, device="cuda", generator=gen)
    rows = [
        row(SamplingParams(temperature=0)),
        row(SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05)),
        row(SamplingParams(temperature=1.0, seed=3), seed=11),
        row(SamplingParams(temperature=0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2),
            output=[5, 5, 7], prompt=[1, 2]),
        row(SamplingParams(temperature=0, logprobs=3), blocked=(int(logits[4].argmax()),)),
        row(SamplingParams(temperature=0.5, top_k=1)),
    ]
    draws = torch.Generator(device="cuda").manual_seed(1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sample(logits, rows, draws)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    tokens = out.token_ids.tolist()
    assert tokens[0] == int(logits[0].argmax()) and tokens[5] == int(logits[5].argmax())  # top_k 1: the argmax
    assert tokens[4] != int(logits[4].argmax())  # masked
    assert out.top_ids is not None and out.top_ids.shape == (6, 3)
