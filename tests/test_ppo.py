"""ppo.py: GAE on hand-computed trajectories (gamma = lambda = 1, lambda < 1, truncation, masks), the clipped value
loss and the PPO-clip loss on hand values, masked whitening, the critic's prefix-shared forward against a plain one
and its device placement, the reward at EOS vs the truncation point (through main), pi_old frozen across mini-batch
epochs, the critic warm-up, a learning test, an end-to-end run, bad flags."""
import json
import math

import pytest
import torch

import common
import ppo

CPU = torch.device("cpu")


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"reward"' in line]


# ---- GAE ---------------------------------------------------------------------------------------------------
def test_gae_gamma_lambda_one_is_return_minus_value_and_never_bootstraps():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]])  # row 2 ends after 2 tokens: its 5.0 is padding
    values = torch.tensor([[0.5, 0.2, 0.7], [0.4, 0.6, 9.0]])   # ... and so is its 9.0 (V past the end is 0)
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])  # row 1 is truncated at the cap: V after its last token is 0 too
    adv, ret = ppo.gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    # A_t = (sum of rewards from t on) - V_t: row 1: 1 - 0.5, 1 - 0.2, 1 - 0.7; row 2: 1 - 0.4, 1 - 0.6, pad 0
    assert torch.allclose(adv, torch.tensor([[0.5, 0.8, 0.3], [0.6, 0.4, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]), atol=1e-6)


def test_gae_lambda_below_one_hand_values():
    rewards, values = torch.tensor([[0.1, 0.0, 1.0]]), torch.tensor([[0.5, 0.2, 0.7]])
    adv, ret = ppo.gae_advantages(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.5)
    # delta_2 = 1 - 0.7 = 0.3; delta_1 = 0.9 * 0.7 - 0.2 = 0.43; delta_0 = 0.1 + 0.9 * 0.2 - 0.5 = -0.22
    a2 = 0.3
    a1 = 0.43 + 0.45 * a2
    a0 = -0.22 + 0.45 * a1
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[a0 + 0.5, a1 + 0.2, a2 + 0.7]]), atol=1e-6)
    adv0, _ = ppo.gae_advantages(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.0)  # lambda 0: one-step TD
    assert torch.allclose(adv0, torch.tensor([[-0.22, 0.43, 0.3]]), atol=1e-6)


def test_masked_whiten_ignores_padding():
    x, mask = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -50.0]]), torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    out = ppo.masked_whiten(x, mask)
    expected = (torch.tensor([1.0, 2, 3, 4]) - 2.5) / math.sqrt(5 / 3 + 1e-8)  # unbiased variance of 1, 2, 3, 4
    assert torch.allclose(out[mask > 0], expected, atol=1e-6)
    assert out[0].tolist() == pytest.approx(expected[:3].tolist()) and out[1, 1:].tolist() == [0.0, 0.0]
    assert torch.equal(out, ppo.masked_whiten(x.masked_fill(mask == 0, 7.0), mask))  # pad values do not matter


# ---- losses --------------------------------------------------------------------------------------------
def test_clipped_value_loss_hand_values():
    old, ret = torch.tensor([[0.2, 0.2, 0.2, 0.2]]), torch.tensor([[1.0, 1.0, 0.0, 3.0]])
    values = torch.tensor([[0.5, 0.1, 0.9, -4.0]], requires_grad=True)  # the 4th token is padding
    mask = torch.tensor([[1.0, 1, 1, 0]])
    loss, stats = ppo.clipped_value_loss(values, old, ret, mask, 0.2, num_tokens=3)
    # tok 0: clipped to 0.4, (0.4 - 1)^2 = 0.36 > (0.5 - 1)^2 = 0.25: the clipped term is active
    # tok 1: inside the range, (0.1 - 1)^2 = 0.81 either way; tok 2: clipped 0.16 < unclipped 0.81
    assert loss.item() == pytest.approx(0.5 * (0.36 + 0.81 + 0.81) / 3)
    assert stats["value_clip_frac"] == 1
    loss.backward()
    assert torch.allclose(values.grad, torch.tensor([[0.0, (0.1 - 1) / 3, 0.9 / 3, 0.0]]), atol=1e-6)


def test_ppo_policy_loss_hand_values_and_k3():
    # tokens: (ratio 1.5, A=+1) clipped at 1.2 | (ratio 0.5, A=-1) clipped at 0.8 | (ratio 0.5, A=+2) not clipped
    old = torch.zeros(1, 3)
    lp = torch.log(torch.tensor([[1.5, 0.5, 0.5]])).requires_grad_()
    adv, mask = torch.tensor([[1.0, -1.0, 2.0]]), torch.ones(1, 3)
    ref = lp.detach() + math.log(2.0)  # pi_ref / pi = 2 at every token: k3 = 2 - log 2 - 1
    loss, stats = ppo.ppo_policy_loss(lp, old, adv, mask, 0.2, 4.0, ref)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 1.0) / 4, abs=1e-6)
    assert stats["clip_frac"] == 2 and stats["kl"] == pytest.approx(3 * (1 - math.log(2)))
    loss.backward()  # clipped tokens carry no gradient; d(-rho A)/dlogp = -rho A = -1 at token 3, over 4 tokens
    assert torch.allclose(lp.grad, torch.tensor([[0.0, 0.0, -0.25]]), atol=1e-6)


# ---- the critic ----------------------------------------------------------------------------------------
def test_critic_parameters_all_on_the_trunks_device_and_head_zero(tiny_model_dir):
    meta = torch.device("meta")  # a head created without device= would land on the CPU
    critic = ppo.build_critic(tiny_model_dir, meta, torch.float32)
    assert {p.device for p in critic.parameters()} == {meta}
    critic = ppo.build_critic(tiny_model_dir, CPU, torch.float32)
    assert critic["head"].bias is None and torch.count_nonzero(critic["head"].weight) == 0
    assert not hasattr(critic["trunk"], "lm_head")


def test_prefix_shared_values_equal_a_plain_forward_values_and_grads(tiny_model_dir):
    critic = ppo.build_critic(tiny_model_dir, CPU, torch.float32).eval()
    torch.nn.init.normal_(critic["head"].weight, generator=torch.Generator().manual_seed(0))
    tok = common.load_tokenizer(tiny_model_dir)
    ids, mask = common.tokenize_prompts(tok, ["Q: 1+1?", "Question: what is 12 + 34? Think."], CPU)  # left-padded
    index = torch.tensor([0, 0, 1])
    completions = torch.randint(2, 80, (3, 5), generator=torch.Generator().manual_seed(1))
    full = torch.cat([ids[index], completions], 1)
    full_mask = torch.cat([mask[index], torch.ones_like(completions)], 1)

    def plain():  # V at the positions that predict completion tokens 0..T-1
        hidden = critic["trunk"](input_ids=full, attention_mask=full_mask,
                                 position_ids=(full_mask.cumsum(1) - 1).clamp(min=0)).last_hidden_state
        return hidden[:, ids.shape[1] - 1:-1] @ critic["head"].weight[0]

    ours = ppo.completion_values(critic, ids, mask, completions, index)
    assert ours.dtype == torch.float32 and torch.allclose(ours, plain(), atol=1e-5)
    weights = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    grads = []
    for fn in (lambda: ppo.completion_values(critic, ids, mask, completions, index), plain):
        critic.zero_grad()
        (fn() * weights).sum().backward()
        grads.append([p.grad.clone() for p in critic.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)


# ---- main: reward placement, frozen pi_old, warm-up, learning, end to end --------------------------------
ONE_REWARD = "def one(prompts, completions, records):\n    return [1.0] * len(completions)\n"
DIGIT_REWARD = ("def digit_fraction(prompts, completions, records):\n"
                "    return [sum(c.isdigit() for c in t) / max(len(t), 1) for t in completions]\n")


def tiny_run(tiny_model_dir, out, reward, *extra):
    (out.parent / f"{out.name}_reward.py").write_text(reward)
    name = reward.split("(")[0].split()[-1]
    ppo.main(["--model", tiny_model_dir, "--reward-fn", f"{out.parent / f'{out.name}_reward.py'}:{name}",
              "--prompts-per-step", "2", "--num-generations", "4", "--max-new-tokens", "6", "--eval-every", "0",
              "--eval-size", "2", "--output-dir", str(out), *extra])
    return metrics(out)


def test_score_sits_on_the_eos_token_or_on_the_last_token_when_truncated(tiny_model_dir, tmp_path, monkeypatch):
    def fake_generate(model, prompt_ids, prompt_mask, num_samples, max_new_tokens, *args, **kwargs):
        B = prompt_ids.shape[0] * num_samples  # even rows: "5" then EOS (id 1); odd rows: 4 digits, no EOS
        ids = torch.tensor([[7, 1, 1, 1] if i % 2 == 0 else [7, 8, 9, 10] for i in range(B)])
        return ids, torch.tensor([2 if i % 2 == 0 else 4 for i in range(B)])
    seen = []
    original = ppo.gae_advantages
    monkeypatch.setattr(ppo, "generate", fake_generate)
    monkeypatch.setattr(ppo, "gae_advantages",
                        lambda r, v, m, g, lam: seen.append((r.clone(), m)) or original(r, v, m, g, lam))
    records = tiny_run(tiny_model_dir, tmp_path / "run", ONE_REWARD, "--steps", "1", "--max-new-tokens", "4",
                       "--beta", "0.5", "--no-save")
    rewards, mask = seen[0]  # at step 1 pi_old == pi_ref, so the k1 term is exactly 0: only the score remains
    assert torch.equal(mask[0], torch.tensor([1.0, 1, 0, 0])) and torch.equal(mask[1], torch.ones(4))
    assert torch.equal(rewards[0::2], torch.tensor([[0.0, 1, 0, 0]]).expand(4, 4))  # on the EOS token itself
    assert torch.equal(rewards[1::2], torch.tensor([[0.0, 0, 0, 1]]).expand(4, 4))  # on the last token kept
    assert records[0]["truncated"] == 0.5 and records[0]["completion_len"] == 3.0


def test_pi_old_frozen_across_minibatches_and_epochs(tiny_model_dir, tmp_path):
    one = tiny_run(tiny_model_dir, tmp_path / "a", DIGIT_REWARD, "--steps", "2", "--num-minibatches", "1",
                   "--lr", "3e-2", "--warmup-steps", "0", "--no-save")
    assert all(r["updates"] == 1 and r["clip_frac"] == 0 for r in one)  # one update: rho = 1, nothing clips
    many = tiny_run(tiny_model_dir, tmp_path / "b", DIGIT_REWARD, "--steps", "2", "--num-minibatches", "2",
                    "--num-ppo-epochs", "3", "--lr", "3e-2", "--warmup-steps", "0", "--no-save")
    assert all(r["updates"] == 6 for r in many)
    assert max(r["clip_frac"] for r in many) > 0  # later updates move off the frozen pi_old and clip


def test_critic_warmup_trains_only_the_critic(tiny_model_dir, tmp_path):
    records = tiny_run(tiny_model_dir, tmp_path / "run", ONE_REWARD, "--steps", "10", "--critic-warmup-steps", "10",
                       "--critic-lr", "3e-3", "--warmup-steps", "0")
    assert all(r["grad_norm"] is None and r["value_grad_norm"] > 0 for r in records)
    # every return is 1 (score 1, and the k1 term is 0 while the actor is the start model): V learns to say 1
    assert records[0]["value_loss"] > 0.4 and records[-1]["value_loss"] < 0.05  # V = 0 at first: 0.5 (0 - 1)^2
    from transformers import AutoModelForCausalLM
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the actor never moved


def test_learning_tiny_model_raises_reward(tiny_model_dir, tmp_path):
    records = tiny_run(tiny_model_dir, tmp_path / "run", DIGIT_REWARD, "--steps", "30", "--prompts-per-step", "4",
                       "--num-generations", "8", "--max-new-tokens", "8", "--lr", "3e-3", "--critic-lr", "3e-3",
                       "--no-save")
    rewards = [r["reward"] for r in records]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.2, (first, last)


def test_end_to_end_logs_every_key_and_saves(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    records = tiny_run(tiny_model_dir, out, DIGIT_REWARD, "--steps", "2", "--eval-every", "1",
                       "--micro-batch-prompts", "2")
    keys = ("reward reward_std correct truncated completion_len samples_used tokens_used updates entropy kl reward_kl "
            "clip_frac value_clip_frac explained_var loss value_loss grad_norm value_grad_norm lr gen_time train_time "
            "step_time tokens_per_s").split()
    assert [r["step"] for r in records] == [1, 2] and all(set(keys) <= set(r) for r in records)
    assert all(r["updates"] == 2 and r["samples_used"] == 8 for r in records)
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval/accuracy" in line]
    assert [r["step"] for r in evals] == [0, 1, 2]
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(out / "model").config.num_hidden_layers == 2


@pytest.mark.parametrize("argv, message", [
    (["--gamma", "-0.1"], "--gamma must be >= 0"),
    (["--lam", "nan"], "--lam must be >= 0"),
    (["--critic-lr", "0"], "--critic-lr must be > 0"),
    (["--cliprange-value", "-1"], "--cliprange-value must be > 0"),
    (["--num-ppo-epochs", "0"], "--num-ppo-epochs must be >= 1"),
    (["--num-minibatches", "0"], "--num-minibatches must be >= 1"),
    (["--critic-warmup-steps", "-1"], "--critic-warmup-steps must be >= 0"),
    (["--beta", "-0.1"], "--beta must be >= 0"),
    (["--epsilon", "0"], "--epsilon must be > 0"),
    (["--num-generations", "0"], "--num-generations must be >= 1"),
])
def test_bad_flags_give_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        ppo.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_missing_dataset_gives_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        ppo.main(["--dataset", str(tmp_path / "nope.jsonl"), "--output-dir", str(tmp_path / "run")])
