"""The losses against hand-computed values and a direct float64 formula."""

import math

import pytest
import torch

from mint.optim.losses import dpo_loss, log1mexp, orpo_loss


def _orpo_reference(c: torch.Tensor, r: torch.Tensor, nll: float, beta: float) -> float:
    """ORPO straight from the paper's definition, in float64 via probabilities."""
    pc, pr = c.double().exp(), r.double().exp()
    log_odds = torch.log(pc / (1 - pc)) - torch.log(pr / (1 - pr))
    return nll - beta * torch.nn.functional.logsigmoid(log_odds).mean().item()


def test_log1mexp_matches_float64_everywhere_including_near_zero():
    x = -torch.logspace(-12, 2, 400, dtype=torch.float64)
    exact = torch.log(-torch.expm1(x))  # exact in float64 over this range
    torch.testing.assert_close(log1mexp(x), exact, rtol=1e-12, atol=1e-15)
    # float32 near 0: the naive log(1 - exp(x)) is -inf at -1e-9 and 1% off at -1e-7; ours is exact
    x32 = torch.tensor([-1e-9, -1e-7, -1e-6, -1e-4], dtype=torch.float32)
    naive = torch.log(1 - torch.exp(x32))
    assert torch.isinf(naive[0]) and abs(naive[1].item() - torch.log(torch.tensor(1e-7)).item()) > 0.1
    torch.testing.assert_close(
        log1mexp(x32).double(), torch.log(-torch.expm1(x32.double())), rtol=1e-5, atol=0
    )


def test_orpo_by_hand():
    # chosen P = 0.5 (odds 1), rejected P = 0.2 (odds 0.25): log odds ratio = ln 4
    c, r = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)])
    loss, m = orpo_loss(c, r, torch.tensor(1.25), beta=0.1)
    expected_lor = math.log(1 / (1 + math.exp(-math.log(4))))  # log σ(ln 4) = log 0.8
    assert loss.item() == pytest.approx(1.25 - 0.1 * expected_lor, abs=1e-6)
    assert m["log_odds_chosen"].item() == pytest.approx(math.log(4), abs=1e-6)
    assert m["log_odds_ratio"].item() == pytest.approx(math.log(0.8), abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(0.1 * math.log(0.5), abs=1e-7)
    assert m["rewards/accuracies"].item() == 1.0
    assert m["nll_loss"].item() == pytest.approx(1.25)


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1.0, 10.0])
def test_orpo_matches_float64_formula_on_random_tensors(scale):
    g = torch.Generator().manual_seed(0)
    c = -torch.rand(64, generator=g, dtype=torch.float64) * scale - 1e-9
    r = -torch.rand(64, generator=g, dtype=torch.float64) * scale - 1e-9
    loss, _ = orpo_loss(c.float(), r.float(), torch.tensor(0.7), beta=0.25)
    assert loss.item() == pytest.approx(_orpo_reference(c.float(), r.float(), 0.7, 0.25), rel=1e-5, abs=1e-6)


def test_orpo_is_finite_with_gradient_when_logps_reach_zero():
    c = torch.tensor([0.0, -1e-9, -2.0], requires_grad=True)
    r = torch.tensor([-3.0, -1e-8, -1e-9], requires_grad=True)
    loss, m = orpo_loss(c, r, torch.tensor(0.0), beta=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(m["log_odds_chosen"])
    assert torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()
    # raising a chosen log-prob must lower the loss, raising a rejected one raise it, even 1e-9
    # below zero (a clamp cutting off there would leave these gradients at 0)
    assert (c.grad[1:] < 0).all() and (r.grad > 0).all()


def test_dpo_by_hand_and_against_float64():
    # policy gains 1 nat on chosen and loses 1 nat on rejected vs. the reference
    pc, pr = torch.tensor([-10.0]), torch.tensor([-12.0])
    rc, rr = torch.tensor([-11.0]), torch.tensor([-11.0])
    loss, m = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.2))), abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(0.1)
    assert m["rewards/rejected"].item() == pytest.approx(-0.1)
    assert m["rewards/margins"].item() == pytest.approx(0.2)
    assert m["rewards/accuracies"].item() == 1.0

    g = torch.Generator().manual_seed(1)
    x = -torch.rand(4, 32, generator=g, dtype=torch.float64) * 200
    got, _ = dpo_loss(*x.float(), beta=0.5)
    z = 0.5 * ((x[0] - x[2]) - (x[1] - x[3]))
    want = torch.log1p(torch.exp(-z)).mean().item()
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_dpo_equal_policy_and_reference_gives_log2():
    x = torch.full((5,), -7.0)
    loss, m = dpo_loss(x, x - 1, x, x - 1, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert m["rewards/accuracies"].item() == 0.0


# --- the losses through PreferenceModule on a real (small, random) Llama --------------------------
def _hand_logps(model, pairs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per pair, the chosen and rejected answers' token log-probs: each sequence on its own, no
    padding, log_softmax of the logits gathered at the next token (float64)."""
    out: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    for pair in pairs:
        for side, ids in enumerate((pair.chosen_ids, pair.rejected_ids)):
            sequence = torch.tensor([pair.prompt_ids + ids])
            with torch.no_grad():
                logps = torch.log_softmax(model(input_ids=sequence).logits[0].double(), -1)
            start = len(pair.prompt_ids)
            out[side].append(logps[start - 1 : -1].gather(-1, torch.tensor(ids)[:, None])[:, 0])
    return out


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("method", ["orpo", "dpo"])
def test_preference_module_orpo_on_mean_and_dpo_on_summed_logps_equal_a_hand_gather(method, packed):
    """ORPO scores an answer by its mean token log-prob, DPO by the sum (as TRL does); both
    through the module's own forward (packed and unpacked) equal the definitions on a hand gather."""
    from mint.optim.module import PreferenceModule
    from mint.pairs.packed import PackedPreferenceCollator
    from mint.pairs.text import PreferenceCollator
    from tests.conftest import random_llama
    from tests.test_packing import random_pairs

    model = random_llama(97, 128)
    pairs = random_pairs(5, seed=11)
    beta = 0.3
    chosen, rejected = _hand_logps(model, pairs)
    ref_c, ref_r = torch.randn(5, dtype=torch.float64) - 20, torch.randn(5, dtype=torch.float64) - 20
    items = [
        {**p.__dict__, "ref_chosen_logps": float(a), "ref_rejected_logps": float(b)}
        for p, a, b in zip(pairs, ref_c, ref_r, strict=True)
    ]
    collator = PackedPreferenceCollator(0) if packed else PreferenceCollator(0)
    module = PreferenceModule(model, method=method, beta=beta, packed=packed).eval()
    with torch.no_grad():
        loss, metrics = module.compute_loss(collator(items))

    logsigmoid = torch.nn.functional.logsigmoid
    if method == "orpo":
        mean_c = torch.stack([t.mean() for t in chosen])
        mean_r = torch.stack([t.mean() for t in rejected])
        odds = lambda m: m - torch.log1p(-m.exp())  # noqa: E731  log(P / (1 - P)), P = exp(mean)
        nll = -torch.cat(chosen).mean()  # over every chosen answer token of the batch
        expected = nll - beta * logsigmoid(odds(mean_c) - odds(mean_r)).mean()
        assert metrics["logps/chosen"].item() == pytest.approx(mean_c.mean().item(), abs=1e-5)
        assert metrics["nll_loss"].item() == pytest.approx(nll.item(), abs=1e-5)
    else:
        sum_c = torch.stack([t.sum() for t in chosen])
        sum_r = torch.stack([t.sum() for t in rejected])
        expected = -logsigmoid(beta * ((sum_c - ref_c) - (sum_r - ref_r))).mean()
        assert metrics["logps/chosen"].item() == pytest.approx(sum_c.mean().item(), abs=1e-4)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
